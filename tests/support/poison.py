"""A seeded generator of the records producers can publish: odd, hostile and plain.

Each :class:`Made` record is a Kafka key, value and headers for one modality's
topic, with ``kind`` saying what the generator meant to make (for the report;
the test does not trust it: every record must end stored or dead-lettered,
whatever it is). Ids the generator writes are unique per record, so an
outcome can be told by the record's position alone (no record overwrites
another's result).
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODALITIES = ("text", "image", "audio")


@dataclass
class Made:
    modality: str
    kind: str
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class PoisonGenerator:
    """Records of every shape, reproducible from ``seed``."""

    def __init__(self, seed: int, models: dict[str, list[str]]) -> None:
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.models = models  # modality -> served model names
        self.count = 0
        self._images = [self._png(), self._jpeg()]
        self._clips = [self._wav(0.3), self._wav(1.0)]

    # ------------------------------------------------------------ public
    def make(self) -> Made:
        self.count += 1
        modality = self.rng.choice(MODALITIES)
        makers: list[tuple[str, Callable[[str], Made]]] = [
            ("bytes", self._bytes), ("json_value", self._json_value),
            ("envelope", self._envelope), ("envelope", self._envelope),
            ("deep", self._deep), ("numbers", self._numbers), ("unicode", self._unicode),
            ("duplicate_keys", self._duplicate_keys), ("many_fields", self._many_fields),
            ("large_fields", self._large_fields), ("wrong_types", self._wrong_types),
        ]
        if modality != "text":
            makers += [("raw", self._raw), ("raw", self._raw), ("uri", self._uri)]
        kind, maker = self.rng.choice(makers)
        made = maker(modality)
        made.kind = kind
        if self.rng.random() < 0.3:
            made.headers += self._headers()
        if made.key is None and self.rng.random() < 0.5:
            made.key = self._key()
        return made

    def good(self, modality: str, event_id: str) -> Made:
        """A plain event that must be stored."""
        body: dict[str, Any] = {"id": event_id}
        if modality == "text":
            body["text"] = f"a plain sentence to embed, number {self.count}"
        else:
            body["data"] = base64.b64encode(self._media(modality)).decode()
        return Made(modality, "good", json.dumps(body).encode(), event_id.encode())

    # ----------------------------------------------------------- pieces
    def _id(self) -> str:
        return f"g{self.count}-{self.rng.randrange(10**6)}"

    def _key(self) -> bytes:
        choice = self.rng.random()
        if choice < 0.4:
            return self._id().encode()
        if choice < 0.7:
            return self.rng.randbytes(self.rng.randrange(8, 40))  # maybe not UTF-8
        return (self._id() + " with space").encode()

    def _headers(self) -> list[tuple[str, bytes]]:
        # (Not embedstream.id: a shared id would let one record overwrite another's result,
        # and outcomes are told apart by position.)
        names = ["trace", "content-type", "embedstream.model", "embedstream.metadata",
                 "x-" + self._text(6)]
        return [(self.rng.choice(names), self._header_value())
                for _ in range(self.rng.randrange(1, 4))]

    def _header_value(self) -> bytes:
        return self.rng.choice([
            self.rng.randbytes(self.rng.randrange(0, 30)), b"image/png", b"audio/wav",
            b"application/json", b"{}", b'{"a": [1, 2]}', b"\xff\xfe", b"",
        ])

    def _text(self, n: int) -> str:
        alphabets = [
            "abcdefghijklmnopqrstuvwxyz ", "ÄÖÜßéèçñ ", "日本語のテキスト", "🙂🚀👩‍👩‍👧",
            "\u200b\u200d\ufeff\u2028", "\x00\x01\x1f\x7f", "\u0301\u0308", "ﷺ𒐫",
        ]
        return "".join(self.rng.choice(self.rng.choice(alphabets)) for _ in range(n))

    def _scalar(self) -> Any:
        return self.rng.choice([
            None, True, False, 0, -1, 2**63, -(2**70), 1e308, -1e-308, 5e-324, 0.1,
            float(self.rng.random()), self._text(self.rng.randrange(0, 20)), "",
            self.rng.randrange(-10**18, 10**18),
        ])

    def _json(self, depth: int = 0) -> Any:
        if depth > 3 or self.rng.random() < 0.4:
            return self._scalar()
        if self.rng.random() < 0.5:
            return [self._json(depth + 1) for _ in range(self.rng.randrange(0, 4))]
        return {self._text(self.rng.randrange(0, 6)): self._json(depth + 1)
                for _ in range(self.rng.randrange(0, 4))}

    def _metadata(self) -> Any:
        if self.rng.random() < 0.2:
            return self._json()
        return {self.rng.choice(["lang", "source", "n", self._text(5)]): self._json(2)
                for _ in range(self.rng.randrange(0, 5))}

    def _media(self, modality: str) -> bytes:
        return self.rng.choice(self._images if modality == "image" else self._clips)

    def _payload(self, modality: str) -> dict[str, Any]:
        roll = self.rng.random()
        if modality == "text":
            text = (self._text(self.rng.randrange(1, 200)) if roll < 0.8
                    else "word " * self.rng.randrange(300, 3000))
            return {"text": text}
        media = self._media(modality)
        if roll < 0.5:
            return {"data": base64.b64encode(media).decode()}
        if roll < 0.7:
            broken = bytearray(media)
            for _ in range(self.rng.randrange(1, 20)):
                broken[self.rng.randrange(len(broken))] = self.rng.randrange(256)
            return {"data": base64.b64encode(bytes(broken[: self.rng.randrange(1, len(broken))]))
                    .decode()}
        if roll < 0.8:
            return {"data": base64.b64encode(self.rng.randbytes(self.rng.randrange(0, 200))).decode()}
        return {"data": self._text(20)}

    # -------------------------------------------------------- record kinds
    def _bytes(self, modality: str) -> Made:
        return Made(modality, "", self.rng.randbytes(self.rng.randrange(0, 300)))

    def _json_value(self, modality: str) -> Made:
        return Made(modality, "", json.dumps(self._json()).encode())

    def _envelope(self, modality: str) -> Made:
        body: dict[str, Any] = {**self._payload(modality)}
        if self.rng.random() < 0.7:
            body["id"] = self._id()
        if self.rng.random() < 0.5:
            body["metadata"] = self._metadata()
        if self.rng.random() < 0.3:
            names = [*self.models.get(modality, []), "no-such-model", ""]
            others = [n for m, ns in self.models.items() if m != modality for n in ns]
            body["model"] = self.rng.choice(names + others[:1])
        if self.rng.random() < 0.2:
            body["version"] = self.rng.choice([1, 2**52, -5, 2**60, "7", 1.5])
        return Made(modality, "", json.dumps(body, ensure_ascii=self.rng.random() < 0.5).encode())

    def _deep(self, modality: str) -> Made:
        depth = self.rng.choice([50, 1000, 100_000])
        nested = "[" * depth + "]" * depth if self.rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        where = self.rng.choice(["top", "metadata", "text"])
        if where == "top":
            value = nested
        else:
            value = (f'{{"id": "{self._id()}", "text": "x", "data": "AAAA", '
                     f'"{"metadata" if where == "metadata" else "text"}": {nested}}}')
        return Made(modality, "", value.encode())

    def _numbers(self, modality: str) -> Made:
        field_name = self.rng.choice(["version", "id", "metadata"])
        numbers = ["1" * 5000, "1e999999", "NaN", "Infinity", "1" * 4000]
        if field_name != "id":
            # JSON has one number type: -0.0, -1e-400 and 0.00...01 (it underflows) are the
            # integer 0, a valid id (so every such record would be document "0", each
            # replacing the one before, and the test could not tell them apart).
            numbers += ["-0.0", "-1e-400", "0." + "0" * 5000 + "1"]
        number = self.rng.choice(numbers)
        body = {"id": self._id(), **self._payload(modality)}
        raw = json.dumps(body)[:-1] + f', "{field_name}": {number}}}'
        return Made(modality, "", raw.encode())

    def _unicode(self, modality: str) -> Made:
        """JSON escapes that decode to what is not Unicode text (lone surrogates) and
        other odd code points, in one field of an otherwise fine envelope."""
        escape = self.rng.choice(["\\ud800", "\\udfff", "\\udbff\\u0041", "\\u0000",
                                  "\\uffff", "\\ud83d\\ude00", "\\ud83d"])
        marker = "@@ESCAPE@@"
        body: dict[str, Any] = {"id": self._id(), **self._payload(modality)}
        where = self.rng.choice(["text" if modality == "text" else "data", "id", "model",
                                 "metadata key", "metadata value"])
        if where == "metadata key":
            body["metadata"] = {f"k{marker}": "v"}
        elif where == "metadata value":
            body["metadata"] = {"k": f"v{marker}"}
        else:
            body[where] = f"{self._id()}{marker}b"
        return Made(modality, "", json.dumps(body).replace(marker, escape).encode())

    def _duplicate_keys(self, modality: str) -> Made:
        payload = json.dumps(self._payload(modality))[1:-1]
        first = json.dumps({"id": self._id()})[1:-1]
        unique_int = self.count * 1000 + 5
        raw = "{" + first + ', "id": ' + json.dumps(self.rng.choice([self._id(), unique_int, None, [1]])) \
            + ", " + payload + ', "text": 1, ' + payload + "}"
        return Made(modality, "", raw.encode())

    def _many_fields(self, modality: str) -> Made:
        n = self.rng.choice([100, 300, 3000, 20_000])
        body = {"id": self._id(), **self._payload(modality),
                "metadata": {f"f{i}": i for i in range(n)}}
        return Made(modality, "", json.dumps(body).encode())

    def _large_fields(self, modality: str) -> Made:
        size = self.rng.choice([10_000, 70_000, 600_000])
        where = self.rng.choice(["metadata", "id", "model", "text"])
        body: dict[str, Any] = {"id": self._id(), **self._payload(modality)}
        if where == "metadata":
            body["metadata"] = {"blob": "x" * size}
        else:
            body[where] = "y" * size
        return Made(modality, "", json.dumps(body).encode())

    def _wrong_types(self, modality: str) -> Made:
        body: dict[str, Any] = {"id": self._id(), **self._payload(modality)}
        name = self.rng.choice(["id", "text", "data", "uri", "model", "metadata", "version"])
        body[name] = self.rng.choice([[1, 2], {"a": 1}, 3.5, True, None, -self.count, ""])
        if self.rng.random() < 0.3:
            body["uri"] = "file:///etc/passwd"
        return Made(modality, "", json.dumps(body).encode())

    def _raw(self, modality: str) -> Made:
        roll = self.rng.random()
        value = (self._media(modality) if roll < 0.5
                 else self.rng.randbytes(self.rng.randrange(0, 500)))
        ctype = self.rng.choice([b"image/png", b"audio/wav", b"image/jpeg", b"text/plain",
                                 b"application/octet-stream", b"\xff"])
        headers = [("content-type", ctype)]
        if self.rng.random() < 0.5:
            headers.append(("embedstream.id", self._id().encode()))
        if self.rng.random() < 0.3:
            headers.append(("embedstream.metadata", json.dumps(self._metadata()).encode()))
        return Made(modality, "", value, headers=headers)

    def _uri(self, modality: str) -> Made:
        uri = self.rng.choice(["file:///etc/passwd", "http://169.254.169.254/latest/meta-data",
                               "s3://bucket/key", "http://not-allowed.test/x.png", "::::",
                               "http://[::1", "ftp://x/y"])
        return Made(modality, "", json.dumps({"id": self._id(), "uri": uri}).encode())

    # ----------------------------------------------------------- media
    def _png(self) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.np.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    def _jpeg(self) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.np.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
        return buffer.getvalue()

    def _wav(self, seconds: float) -> bytes:
        import soundfile

        rate = 16_000
        t = np.arange(int(rate * seconds)) / rate
        wave = 0.3 * np.sin(2 * math.pi * 440 * t) + self.np.normal(0, 0.01, t.shape)
        buffer = io.BytesIO()
        soundfile.write(buffer, wave.astype(np.float32), rate, format="WAV")
        return buffer.getvalue()
