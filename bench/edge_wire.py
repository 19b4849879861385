"""Encoding one Embed answer on the edge worker's event loop: the generated protobuf classes
(`tolist()`, then the repeated fields) against `edge.wire.embed_response`, side by side, for answers
of 1 to 64 vectors of all-MiniLM-L6-v2's 384 dimensions (the gateway coalesces up to 64 inputs
into one call). Both give the same bytes; the time is what the loop spends per answer.

    python bench/edge_wire.py [--dim 384] [--rows 1,8,32,64] [--seconds 0.5] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine  # noqa: E402  (bench/ is the script's own folder)
from record import record  # noqa: E402

import numpy as np  # noqa: E402

from edge.api import edge_pb2  # noqa: E402
from edge.wire import embed_response  # noqa: E402

MODEL = "all-minilm-l6-v2"


def with_protobuf(vectors: np.ndarray, counts: list[int]) -> bytes:
    """The answer as the service built it before edge.wire."""
    message = edge_pb2.EmbedResponse(model=MODEL, prompt_tokens=sum(counts), token_counts=counts)
    message.embeddings.extend(edge_pb2.Embedding(values=row) for row in vectors.tolist())
    return message.SerializeToString()


def with_wire(vectors: np.ndarray, counts: list[int]) -> bytes:
    return embed_response(MODEL, vectors, sum(counts), counts).data


def microseconds(encode: Callable[[np.ndarray, list[int]], bytes], vectors: np.ndarray, counts: list[int],
                 seconds: float) -> float:
    """Median over 5 timed runs of `seconds` / 5 each, per call."""
    encode(vectors, counts)
    runs = []
    for _ in range(5):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / 5:
            encode(vectors, counts)
            calls += 1
        runs.append(elapsed / calls * 1e6)
    return sorted(runs)[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rows", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=0.5, help="timed seconds per figure")
    p.add_argument("--write-docs", action="store_true", help="update the edge_wire section of docs/BENCHMARKS.md")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    lines = ["| vectors | protobuf classes us | edge.wire us | ratio |", "|---:|---:|---:|---:|"]
    for rows in (int(r) for r in args.rows.split(",")):
        vectors = rng.standard_normal((rows, args.dim)).astype(np.float32)
        counts = [int(c) for c in rng.integers(5, 60, rows)]
        if with_protobuf(vectors, counts) != with_wire(vectors, counts):
            print(f"{rows} vectors: the two encodings differ", file=sys.stderr)
            return 1
        old, new = (microseconds(f, vectors, counts, args.seconds) for f in (with_protobuf, with_wire))
        lines.append(f"| {rows} | {old:.1f} | {new:.1f} | {old / new:.1f}x |")
        print(lines[-1], flush=True)
    section = "\n".join([
        "## Edge worker: encoding an Embed answer (`bench/edge_wire.py`)",
        "",
        f"**Command:** `python bench/edge_wire.py --dim {args.dim} --rows {args.rows}`. **Machine:** "
        f"{machine()}, Python {platform.python_version()}, {datetime.date.today().isoformat()}. "
        f"Microseconds per answer of {args.dim}-dimension vectors, one thread, median of 5 runs; both encodings checked byte-identical first.",
        "",
        *lines,
    ])
    print(section)
    if args.write_docs:
        record("edge_wire", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
