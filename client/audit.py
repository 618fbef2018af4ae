"""A hospital's own record of everything its client sends to the server.

`audit_mod` wraps the whole ClientApp. When the SuperNode's node config names an
`audit-log` file (`equifed-client start --audit-log FILE`), every reply is described
there, one JSON line per message, before it leaves: record names, array keys with shapes
and dtypes (never their values), every metric and config entry with its value, and the
text of any error. A privacy officer can read it; the deployment test checks it.
"""

from __future__ import annotations

import json
import time

from flwr.app import Context, Message

from core_models.protocol import CONFIG, SERVER_ROUND


def describe(msg: Message) -> dict:
    """What a reply carries, in plain JSON (array contents left out: they are weights)."""
    if msg.has_error():
        return {"error": {"code": int(msg.error.code), "reason": str(msg.error.reason)}}
    content = msg.content
    out: dict = {"arrays": {}, "metrics": {}, "configs": {}}
    for name, record in content.array_records.items():
        out["arrays"][name] = {key: {"shape": list(arr.shape), "dtype": str(arr.dtype)}
                               for key, arr in record.items()}
    for name, record in content.metric_records.items():
        out["metrics"][name] = {key: _plain(value) for key, value in record.items()}
    for name, record in content.config_records.items():
        out["configs"][name] = {key: _plain(value) for key, value in record.items()}
    return out


def _plain(value):
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Log the reply (or the error the handler raised) when the site asked for an audit log."""
    path = str(context.node_config.get("audit-log", ""))
    if not path:
        return call_next(msg, context)
    entry = {"time": time.time(), "run_id": int(context.run_id), "message_type": msg.metadata.message_type,
             "reply_to": msg.metadata.message_id}
    config = msg.content.config_records.get(CONFIG)
    if config is not None and SERVER_ROUND in config:
        entry["server_round"] = int(config[SERVER_ROUND])
    try:
        reply = call_next(msg, context)
    except Exception as err:
        entry["raised"] = f"{type(err).__name__}: {err}"
        _append(path, entry)
        raise
    entry.update(describe(reply))
    _append(path, entry)
    return reply


def _append(path: str, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
