"""Flower's side of the protocol (core_models/protocol.py): a message's plain records read from a Flower Message,
and a typed message written into one. The only place that knows which record type each name travels as."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from core_models.protocol import (ARRAYS, CONFIG, SECURE_SITES, SERVER_ROUND, Records, SiteReply, StatisticsRequest,
                                  site_error)
from core_models.secagg import MESSAGE_TYPE, SECAGG, SecAggError


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


def secure_train(msg: Message, sites: int) -> None:
    """Make a train request secure (protocol.SECURE_SITES): the site keeps its model for the secure sum."""
    msg.content[CONFIG] = ConfigRecord({**dict(msg.content[CONFIG]), SECURE_SITES: sites})


def with_arrays(msg: Message, arrays: ArrayRecord) -> Message:
    """A secure round's train reply given the consortium's mean, for Flower's aggregation (which then averages
    identical models, so FedAvg's mean and FedAdam's step act on the unmasked aggregate)."""
    msg.content[ARRAYS] = arrays
    return msg


def secagg_request(record: ConfigRecord, node: int, server_round: int) -> Message:
    """One stage of a secure sum (core_models/secagg.py) to one site, with the round it sums."""
    content = RecordDict({SECAGG: record, CONFIG: ConfigRecord({SERVER_ROUND: server_round})})
    return Message(content=content, dst_node_id=node, message_type=MESSAGE_TYPE)


def secagg_record(msg: Message) -> ConfigRecord | ArrayRecord:
    """The stage record a secure-sum request or reply carries (SecAggError when it carries none)."""
    content = msg.content
    if SECAGG in content.array_records:
        return content.array_records[SECAGG]
    if SECAGG in content.config_records:
        return content.config_records[SECAGG]
    raise SecAggError("secagg message without a stage record")


def secagg_reply(msg: Message, record: ConfigRecord | ArrayRecord) -> Message:
    return Message(content=RecordDict({SECAGG: record}), reply_to=msg)
