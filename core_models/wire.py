"""Flower's side of the protocol (core_models/protocol.py): a message's plain records read from a Flower Message,
and a typed message written into one. The only place that knows which record type each name travels as."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from core_models.protocol import ARRAYS, CONFIG, Records, SiteReply, StatisticsRequest, site_error


def records_of(msg: Message) -> Records:
    """The message's config and metric records as plain dicts (its arrays stay in the message)."""
    content = msg.content
    return Records(configs={name: dict(rec) for name, rec in content.config_records.items()},
                   metrics={name: dict(rec) for name, rec in content.metric_records.items()})


def content_of(records: Records, arrays: ArrayRecord | None = None) -> RecordDict:
    configs = {name: ConfigRecord(dict(values)) for name, values in records.configs.items()}
    metrics = {name: MetricRecord(dict(values)) for name, values in records.metrics.items()}
    return RecordDict({**({} if arrays is None else {ARRAYS: arrays}), **metrics, **configs})


def reply(msg: Message, report: SiteReply, arrays: ArrayRecord | None = None) -> Message:
    """A site's reply to `msg`: the report's records, and the model it trained (a train reply)."""
    return Message(content=content_of(report.to_records(), arrays), reply_to=msg)


def error_reply(msg: Message, code: int, site: str, text: str) -> Message:
    """An Error reply that names the site (protocol.error_site reads it back)."""
    return Message(Error(code=code, reason=site_error(site, text)), reply_to=msg)


def query(request: StatisticsRequest, arrays: ArrayRecord, node: int) -> Message:
    """A statistics request to one site, with the global model the statistics are of."""
    return Message(content=RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(request.to_config())}),
                   dst_node_id=node, message_type=MessageType.QUERY)


def reply_of(msg: Message) -> SiteReply:
    """A site's (non-error) reply, typed."""
    return SiteReply.from_records(records_of(msg))
