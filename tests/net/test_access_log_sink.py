from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resilient_ambassador.net.access_log import _atomic_chunks


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=40))
def test_chunks_end_at_line_ends_and_fit_the_atomic_limit(lengths: list[int]) -> None:
    data = b"".join(b"x" * n + b"\n" for n in lengths)
    chunks = _atomic_chunks(data, limit=256)
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 256 or chunk.count(b"\n") == 1  # only an over-long line stands alone
