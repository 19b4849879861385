"""The hand-made EmbedResponse bytes are protobuf's own, field by field and for every edge case."""

from __future__ import annotations

import numpy as np
import pytest

from edge.api import edge_pb2
from edge.wire import Encoded, EncodedCodec, embed_response


def protobuf_bytes(model: str, vectors: np.ndarray, prompt_tokens: int, token_counts: list[int]) -> bytes:
    message = edge_pb2.EmbedResponse(model=model, prompt_tokens=prompt_tokens, token_counts=token_counts)
    message.embeddings.extend(edge_pb2.Embedding(values=row) for row in vectors.tolist())
    return message.SerializeToString()


@pytest.mark.parametrize(
    "model,rows,dim,prompt_tokens",
    [
        ("all-minilm-l6-v2", 1, 384, 7),
        ("all-minilm-l6-v2", 64, 384, 1_000_000),  # multi-byte varints: lengths, counts, tokens
        ("m", 3, 31, 0),  # 124-byte rows: a one-byte length; no prompt tokens: the field is left out
        ("", 2, 40, 5),  # 160-byte rows: a two-byte length; an empty model: left out
        ("é-modèle", 0, 384, 0),  # no rows at all; a non-ASCII name
        ("m", 2, 0, 3),  # rows of no values: empty Embedding messages
    ],
)
def test_the_bytes_are_protobufs_own(model, rows, dim, prompt_tokens):
    rng = np.random.default_rng(rows * 1000 + dim)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    if rows and dim:
        vectors[0, 0] = -0.0
        vectors[-1, -1] = np.float32(3.4e38)
    counts = [int(c) for c in rng.integers(1, 300, rows)]
    got = embed_response(model, vectors, prompt_tokens, counts)
    assert isinstance(got, Encoded)
    assert got.data == protobuf_bytes(model, vectors, prompt_tokens, counts)
    parsed = edge_pb2.EmbedResponse.FromString(got.data)
    assert parsed.model == model and parsed.prompt_tokens == prompt_tokens
    assert list(parsed.token_counts) == counts
    values = np.array([list(e.values) for e in parsed.embeddings], np.float32).reshape(rows, dim)
    assert np.array_equal(values, vectors)


def test_token_counts_of_one_byte_and_of_several():
    vectors = np.ones((3, 4), np.float32)
    for counts in ([3, 4, 127], [3, 128, 20000]):
        got = embed_response("m", vectors, sum(counts), counts).data
        assert got == protobuf_bytes("m", vectors, sum(counts), counts)


def test_strided_and_float64_vectors_are_sent_as_float32_rows():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    view = base[::2, 1::2]  # neither contiguous nor float32
    got = embed_response("m", view, 2, [1, 1])
    assert got.data == protobuf_bytes("m", view.astype(np.float32), 2, [1, 1])


def test_the_codec_sends_encoded_bytes_as_they_are_and_other_messages_as_protobuf_does():
    codec = EncodedCodec()
    assert codec.encode(Encoded(b"\x0a\x01m"), edge_pb2.EmbedResponse) == b"\x0a\x01m"
    message = edge_pb2.EmbedResponse(model="m", prompt_tokens=3)
    assert codec.encode(message, edge_pb2.EmbedResponse) == message.SerializeToString()
    with pytest.raises(TypeError):
        codec.encode(edge_pb2.Embedding(), edge_pb2.EmbedResponse)
