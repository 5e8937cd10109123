"""Dead letters always fit, and a failed one is retried without a thread per failure."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time

from embedstream.envelope import RawRecord
from embedstream.metrics import Metrics
from embedstream.retry import Backoff
from embedstream.sources.common import HEADER_VALUE_KIND, dead_letter
from embedstream.worker.deadletters import DeadLetterer

LIMIT = 1_000_000


def record(value: bytes, key: bytes | None = b"k", headers=()) -> RawRecord:
    return RawRecord("embedstream.text", 3, 1207, key, value, 1_700_000_000_000, tuple(headers))


def test_a_letter_that_fits_carries_the_original_untouched():
    letter = dead_letter(record(b'{"text": 1}', headers=[("trace", b"t1")]), "invalid_field",
                         "bad", LIMIT)
    headers = dict(letter.headers)
    assert not letter.reference and letter.value == b'{"text": 1}' and letter.key == b"k"
    assert headers[HEADER_VALUE_KIND] == b"original" and headers["trace"] == b"t1"
    assert headers["embedstream.reason"] == b"invalid_field"


def test_a_record_too_large_to_copy_becomes_a_reference_to_its_source_position():
    value = b"x" * 3_000_000
    letter = dead_letter(record(value, headers=[("trace", b"t1")]), "payload_too_large",
                         "value is 3000000 bytes", LIMIT)
    body = json.loads(letter.value)
    headers = dict(letter.headers)
    assert letter.reference and len(letter.value) < 4096
    assert headers[HEADER_VALUE_KIND] == b"reference"
    assert headers["embedstream.reason"] == b"payload_too_large"
    assert headers["embedstream.source.offset"] == b"1207" and headers["trace"] == b"t1"
    assert (body["topic"], body["partition"], body["offset"]) == ("embedstream.text", 3, 1207)
    assert body["value_bytes"] == 3_000_000
    assert body["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert base64.b64decode(body["value_prefix_b64"]) == value[:512]


def test_a_huge_key_and_headers_are_left_out_of_a_reference_but_described():
    key = b"k" * 100_000
    letter = dead_letter(record(b"v" * 2_000_000, key=key, headers=[("h", b"x" * 500_000)]),
                         "payload_too_large", "big", LIMIT)
    body = json.loads(letter.value)
    assert letter.key is None and body["key_sha256"] == hashlib.sha256(key).hexdigest()
    assert not body["headers_kept"] and "h" not in dict(letter.headers)
    assert sum(len(v) for _, v in letter.headers) + len(letter.value) < 16_000


def test_the_minimal_form_is_a_reference_even_for_a_small_record():
    letter = dead_letter(record(b"small"), "internal_error", "x", LIMIT, minimal=True)
    assert letter.reference and json.loads(letter.value)["value_bytes"] == 5


class FlakyTransport:
    """Fails the first ``failures`` sends (asynchronously, or by raising), then delivers."""

    def __init__(self, failures: int, raise_instead: bool = False) -> None:
        self.failures = failures
        self.raise_instead = raise_instead
        self.sent: list[tuple[int, str]] = []
        self.attempts = 0

    def send(self, rec, reason, detail, on_done, on_error):
        self.attempts += 1
        if self.attempts <= self.failures:
            if self.raise_instead:
                raise RuntimeError("refused at once")
            on_error(RuntimeError("broker away"))
            return
        self.sent.append((rec.offset, reason))
        on_done()

    def flush(self, timeout_s): ...

    def close(self): ...


def test_a_failed_letter_is_retried_until_written_then_done():
    for raise_instead in (False, True):
        transport = FlakyTransport(3, raise_instead)
        done: list[list] = []
        letters = DeadLetterer(transport, Metrics(), done.append, Backoff(0.01, 0.02))
        threads = threading.active_count()
        letters.reject(record(b"{"), "invalid_json", "bad")
        assert not letters.ok
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            assert threading.active_count() <= threads  # retries share one thread
            time.sleep(0.005)
        assert done == [[("embedstream.text", 3, 1207)]]
        assert transport.sent == [(1207, "invalid_json")] and transport.attempts == 4
        assert letters.ok
        letters.close()
