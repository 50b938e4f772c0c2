"""A tiny OTLP/HTTP collector for tests: accepts protobuf exports and decodes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import final

import h11
import trio
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


@final
@dataclass
class OtlpCollector:
    port: int = 0
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    content_types: list[bytes] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def span_names(self) -> list[str]:
        return [
            span.name
            for export in self.traces
            for resource in export.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target, body = b"", b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                target = event.target
                self.content_types.extend(v for n, v in event.headers if n == b"content-type")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        if target == b"/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.traces.append(request)
        elif target == b"/v1/metrics":
            metrics = ExportMetricsServiceRequest()
            metrics.ParseFromString(body)
            self.metrics.append(metrics)
        headers = [
            ("content-type", "application/x-protobuf"),
            ("content-length", "0"),
            ("connection", "close"),
        ]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        await stream.aclose()


async def start_otlp_collector(nursery: trio.Nursery) -> OtlpCollector:
    collector = OtlpCollector()
    listeners = await nursery.start(partial(trio.serve_tcp, collector.handle, 0, host="127.0.0.1"))
    collector.port = listeners[0].socket.getsockname()[1]
    return collector
