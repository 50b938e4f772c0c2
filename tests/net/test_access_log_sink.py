from __future__ import annotations

import json
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from resilient_ambassador.core.access_log import AccessRecord, to_json
from resilient_ambassador.core.config import AccessLogConfig
from resilient_ambassador.net.access_log import FORMAT_SLICE, MAX_PENDING_RECORDS, AccessLog, _atomic_chunks


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=40))
def test_chunks_end_at_line_ends_and_fit_the_atomic_limit(lengths: list[int]) -> None:
    data = b"".join(b"x" * n + b"\n" for n in lengths)
    chunks = _atomic_chunks(data, limit=256)
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 256 or chunk.count(b"\n") == 1  # only an over-long line stands alone


def _record(target: bytes) -> AccessRecord:
    return AccessRecord(0.5, "main", b"10.0.0.1", b"GET", target, 200, 3, 0.001)


async def test_records_are_formatted_and_redacted_when_the_batch_is_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(path=str(path)), secret_values=lambda: {"s3cr3t"})
    log.open()
    log.record(_record(b"/a?api_key=k1&page=2"))
    log.record(_record(b"/b/s3cr3t"))
    assert path.read_bytes() == b""  # nothing is formatted or written on the request path
    await log.aclose()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [entry["path"] for entry in lines] == ["/a?api_key=REDACTED&page=2", "/b/REDACTED"]


async def test_records_beyond_the_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    # A stdout nobody reads: records pile up to the bound, then new ones are counted and dropped.
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(path=str(path)))
    log.open()
    for n in range(MAX_PENDING_RECORDS + 5):
        log.record(_record(b"/%d" % n))
    assert (log.lines, log.dropped) == (MAX_PENDING_RECORDS, 5)
    await log.aclose()
    assert len(path.read_text().splitlines()) == MAX_PENDING_RECORDS


async def test_a_big_batch_is_formatted_in_slices_that_let_requests_run(tmp_path: Path) -> None:
    # One request's task running between the slices stands for every request arriving
    # meanwhile: formatting 1-2 ms of records in one go would make them all wait.
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(path=str(path)))
    log.open()
    order: list[str] = []

    def formatter(record: AccessRecord) -> str:
        order.append("format")
        return to_json(record)

    log._format = formatter
    for n in range(3 * FORMAT_SLICE):
        log.record(_record(b"/%d" % n))

    async def request() -> None:
        while len(order) < 3 * FORMAT_SLICE:
            order.append("request")
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.flush)
        nursery.start_soon(request)
    formats = [i for i, step in enumerate(order) if step == "format"]
    between = [i for i, step in enumerate(order) if step == "request" and formats[0] < i < formats[-1]]
    assert len(between) >= 2  # at least once between each pair of slices
    assert all(step == "format" for step in order[formats[0] : formats[0] + FORMAT_SLICE])
    await log.aclose()
    assert len(path.read_text().splitlines()) == 3 * FORMAT_SLICE


async def test_a_flush_cancelled_mid_batch_still_writes_every_record(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(path=str(path)))
    log.open()
    for n in range(3 * FORMAT_SLICE):
        log.record(_record(b"/%d" % n))
    with trio.CancelScope() as scope:
        scope.cancel()  # already cancelled when the first slice yields
        await log.flush()
    await log.aclose()
    assert len(path.read_text().splitlines()) == 3 * FORMAT_SLICE
