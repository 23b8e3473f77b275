"""The bodies the proxy builds itself: cut bodies, next-turn bodies, added breakpoints, warm requests.

Every body built here is one today's models accept, because a warm the upstream refuses costs a
call and warms nothing:

- it ends on a user turn: a cut or a next-turn body that would end on an assistant turn gets a
  short closing user turn after it (tool results for the assistant's ``tool_use`` blocks, or
  ``"."``), so models without assistant prefill (Claude 4.6 and later) accept it, and no final
  assistant text can end in whitespace;
- it never splits a ``tool_use``/``tool_result`` pair;
- a warm whose breakpoints all lie in tools or system drops ``thinking`` and ``tool_choice``: they
  change only the messages level of the cache, and they are what makes ``max_tokens: 0`` refused.

The closing turn comes after the last breakpoint, so it is never part of what is cached. Each
builder returns the new body's identity too, derived from the one already computed (no parsing or
hashing again). Shallow copies only: the client's parsed body is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from specproxy.prefix import Prefix

_PLACEHOLDER: Final = "."
# What only the messages level depends on (see the invalidation table in the caching facts).
_MESSAGES_LEVEL_FIELDS: Final = ("thinking", "tool_choice")


def _marked(block: Any, ttl: str) -> dict[str, Any]:
    cc: dict[str, Any] = {"type": "ephemeral"}
    if ttl != "5m":
        cc["ttl"] = ttl
    return {**block, "cache_control": cc}


def _mark_in(value: Any, index: int, ttl: str) -> list[Any]:
    """A list of blocks (or a plain string as one text block) with the one at ``index`` marked."""
    if index < 0:
        return [_marked({"type": "text", "text": value}, ttl)]
    out = list(value)
    out[index] = _marked(out[index], ttl)
    return out


def with_breakpoint_at(body: dict[str, Any], prefix: Prefix, position: int, ttl: str = "5m") -> dict[str, Any]:
    """A copy of ``body`` whose item at ``position`` carries ``cache_control``."""
    section, i, b = prefix.locations[position]
    out = dict(body)
    if section == "messages":
        messages = list(body["messages"])
        messages[i] = {**messages[i], "content": _mark_in(messages[i]["content"], b, ttl)}
        out["messages"] = messages
    else:
        out[section] = _mark_in(body[section], i, ttl)
    return out


def with_implicit_breakpoint(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` with top-level automatic ``cache_control``: the last cacheable block gets one."""
    return {**body, "cache_control": {"type": "ephemeral"}}


def _unmarked(block: Any) -> Any:
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def _is(block: Any, kind: str) -> bool:
    return isinstance(block, dict) and block.get("type") == kind


def closing_turn(assistant: dict[str, Any]) -> dict[str, Any]:
    """The user turn that may follow ``assistant``: a result for each of its tool calls, or ``"."``."""
    content = assistant.get("content")
    ids = [b["id"] for b in content if _is(b, "tool_use") and isinstance(b.get("id"), str)] if isinstance(
        content, list) else []
    if not ids:
        return {"role": "user", "content": _PLACEHOLDER}
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": i, "content": _PLACEHOLDER}
                                        for i in ids]}


def _ends_on_user(messages: list[Any]) -> list[Any]:
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "user":
        return messages
    return [*messages, closing_turn(last) if isinstance(last, dict) else {"role": "user", "content": _PLACEHOLDER}]


def _safe_ttl(prefix: Prefix, ttl: str) -> str:
    """A TTL for a breakpoint added after ``prefix``'s: a 1h one may not follow a 5m one."""
    return "5m" if any(bp.ttl == "5m" for bp in prefix.breakpoints) else ttl


def cut(body: dict[str, Any], prefix: Prefix, position: int, ttl: str = "5m") -> tuple[dict[str, Any], Prefix] | None:
    """``body`` with its prompt ending at ``position`` and a breakpoint there, and that body's identity.

    None when no cut body can stand for the prefix: a cut inside the messages of a body with images
    (images anywhere change the messages level, so dropping those after the cut changes it too).
    """
    section, i, b = prefix.locations[position]
    if section == "messages" and prefix.images:
        return None
    identity = prefix.cut(position)
    out = {k: v for k, v in body.items() if k != "cache_control"}  # automatic caching would land elsewhere
    if section == "tools":
        out["tools"] = list(body["tools"][: i + 1])
        out.pop("system", None)
        messages: list[Any] = []
    elif section == "system":
        if i >= 0:
            out["system"] = list(body["system"][: i + 1])
        messages = []
    else:
        messages = list(body["messages"][:i])
        msg = body["messages"][i]
        if b >= 0:
            content = msg["content"]
            kept = list(content[: b + 1])
            if msg.get("role") == "user":
                # Keep the rest of this turn's tool results: their tool_use calls are before the cut.
                kept += [_unmarked(c) for c in content[b + 1:] if _is(c, "tool_result")]
            msg = {**msg, "content": kept}
        messages.append(msg)
    if section != "messages":
        for name in _MESSAGES_LEVEL_FIELDS:
            out.pop(name, None)
    out["messages"] = messages
    auto = body.get("cache_control")
    if isinstance(auto, dict) or all(bp.position != position for bp in identity.breakpoints):
        # An automatic breakpoint may sit on this block: the cut dropped the top-level marker (it
        # would land elsewhere in a shorter body), so the block carries it explicitly instead.
        if isinstance(auto, dict) and auto.get("ttl") in ("5m", "1h"):
            ttl = auto["ttl"]
        ttl = _safe_ttl(identity, ttl)
        out, identity = with_breakpoint_at(out, identity, position, ttl), identity.with_breakpoint(position, ttl)
    out["messages"] = _ends_on_user(out["messages"])
    return out, identity


def next_turn(body: dict[str, Any], prefix: Prefix, reply: Sequence[Any]) -> tuple[dict[str, Any], Prefix] | None:
    """The conversation extended with the assistant's ``reply``, breakpoint on the reply's last
    cacheable block, closed by a placeholder user turn; and its identity (the chain extended).

    None when the reply cannot be sent back as it came (an empty text block, an image), when the
    conversation ended on an assistant turn, or when no breakpoint slot is left.
    """
    blocks = [dict(b) for b in reply if isinstance(b, dict)]
    if not blocks or any((_is(b, "text") and not b.get("text")) or _is(b, "image") for b in blocks):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    if messages[-1].get("role") != "user" or not prefix.breakpoints:
        return None
    base = prefix.without_breakpoints_in("messages")
    identity = base.extended(len(messages), "assistant", blocks)
    new = [p for p in range(base.item_count, identity.item_count) if p in identity.cacheable]
    if not new or len(identity.breakpoints) >= 4:
        return None
    stripped = [
        {**m, "content": [_unmarked(c) for c in m["content"]]} if isinstance(m, dict) and isinstance(
            m.get("content"), list) else m
        for m in messages
    ]
    out = {k: v for k, v in body.items() if k not in ("cache_control", "stream", "messages")}
    out["messages"] = [*stripped, {"role": "assistant", "content": blocks}]
    ttl = _safe_ttl(identity, prefix.breakpoints[-1].ttl)
    out = with_breakpoint_at(out, identity, new[-1], ttl)
    out["messages"] = _ends_on_user(out["messages"])
    return out, identity.with_breakpoint(new[-1], ttl)


def warm_request(body: dict[str, Any], prefix: Prefix) -> dict[str, Any]:
    """What a warm of ``body`` sends, before ``max_tokens``: no ``stream``; and where every breakpoint
    lies in tools or system, no ``thinking`` or ``tool_choice`` (they do not change that prefix)."""
    drop: tuple[str, ...] = ("stream", "max_tokens")
    if prefix.breakpoints_before_messages:
        drop += _MESSAGES_LEVEL_FIELDS
    return {k: v for k, v in body.items() if k not in drop}
