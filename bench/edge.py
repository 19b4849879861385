"""Edge worker throughput: embeddings per second with and without dynamic batching, against a bare
ONNX Runtime session at the same batch sizes, and small-LM tokens per second.

    python bench/edge.py [--seconds 6] [--concurrency 1,8,32,64] [--write-docs]

Each served figure is a real worker process (`python -m edge.server`, one ORT thread, one
inference thread, L1 cache off so every input runs the model) driven over gRPC by closed-loop
clients sending one sentence per Embed request. "bare ORT" runs the same exported model in this
process with `session.run` on batches of `concurrency` sentences (tokenize + run + pool, no RPC).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import record  # noqa: E402  (bench/ is the script's own folder)

from grpclib.client import Channel

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeStub
from edge.runtime.embedding import EmbeddingModel
from edge.runtime.generation import GenerateParams, KVCache, SmallLM

EMBED, LM = "all-minilm-l6-v2", "edge-small"
WORDS = ("edge", "request", "vector", "zone", "latency", "cache", "model", "batch", "user", "cloud",
         "answer", "token", "stream", "gateway", "worker", "drain")


def sentence(i: int) -> str:
    """A distinct ~20-token sentence per index, so no two requests are the same input."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12)]
    return f"Sentence {i}: the " + " ".join(words) + f" number {i % 97}."


def start_worker(models: dict[str, Path], port_file: Path, *flags: str) -> subprocess.Popen:
    """A worker process on a free loopback port; returns once it reports SERVING."""
    argv = [sys.executable, "-m", "edge.server", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
            "--workers", "1", "--l1-cache-entries", "0", "--port-file", str(port_file), *flags]
    for name, path in models.items():
        argv += ["--model", f"{name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("edge worker did not start")
        time.sleep(0.05)
    return proc


async def embed_rate(port: int, concurrency: int, seconds: float) -> float:
    """Embeddings per second from `concurrency` closed-loop clients, one sentence per request."""
    counter = iter(range(10**9))
    done = 0
    async with Channel("127.0.0.1", port) as channel:
        stub = EdgeStub(channel)
        await stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=["warm up"]), timeout=60)

        async def client(stop_at: float) -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=[sentence(next(counter))]), timeout=60)
                done += 1

        warm_until = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(client(warm_until) for _ in range(concurrency)))
        done = 0
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds) for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def bare_rate(model: EmbeddingModel, batch: int, seconds: float) -> float:
    """Embeddings per second of the bare session on batches of `batch` distinct sentences."""
    i = 0
    model.embed([sentence(j) for j in range(batch)])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.embed([sentence(i + j) for j in range(batch)])
        i += batch
        done += batch
    return done / (time.perf_counter() - started)


def lm_rates(lm_dir: Path, seconds: float) -> list[tuple[str, float, float]]:
    """(precision, decode tokens/s, prefill ms of a ~20-token prompt) of the generation loop, one thread."""
    rows = []
    for int8 in (False, True):
        lm = SmallLM.load(lm_dir, threads=1, int8=int8)
        prompt = "Question: what is the capital of France? Answer: Paris. Once upon a time,"
        params = GenerateParams(max_tokens=128, temperature=0.8, seed=1)
        tokens, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            tokens += sum(len(c.token_ids) for c in lm.stream(prompt, params))
        rate = tokens / (time.perf_counter() - started)
        ids = lm.encode(prompt)
        t0 = time.perf_counter()
        for _ in range(20):
            lm.forward(ids, KVCache())
        prefill_ms = (time.perf_counter() - t0) / 20 * 1000
        rows.append(("int8" if int8 else "fp32", rate, prefill_ms))
    return rows


def run(args: argparse.Namespace) -> str:
    """Measure everything and return the Markdown section."""
    cache = Path(os.environ.get("MERIDIAN_CACHE", Path.home() / ".cache" / "meridian")) / "edge"
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, float]] = {"batched": {}, "one": {}, "bare": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, flags in (("batched", ("--max-batch", str(max(levels)), "--max-queue-delay-ms", "2")),
                            ("one", ("--max-batch", "1", "--max-queue-delay-ms", "0"))):
            port_file = Path(tmp) / f"{mode}.port"
            proc = start_worker({EMBED: cache / EMBED}, port_file, *flags)
            try:
                port = int(port_file.read_text())
                for c in levels:
                    results[mode][c] = asyncio.run(embed_rate(port, c, args.seconds))
                    print(f"{mode:8s} c={c:3d} {results[mode][c]:8.1f} emb/s", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    model = EmbeddingModel.load(cache / EMBED, threads=1)
    for c in levels:
        results["bare"][c] = bare_rate(model, c, args.seconds)
        print(f"bare ORT batch={c:3d} {results['bare'][c]:8.1f} emb/s", flush=True)
    lm = lm_rates(cache / LM, args.seconds)
    for precision, rate, prefill in lm:
        print(f"LM {precision}: {rate:.0f} tok/s decode+sample, prefill {prefill:.2f} ms", flush=True)
    return markdown(levels, results, lm, args)


def markdown(levels: list[int], r: dict[str, dict[int, float]], lm: list, args: argparse.Namespace) -> str:
    """The edge section of docs/BENCHMARKS.md."""
    lines = [
        "## Edge worker: embeddings with dynamic batching, small-LM tokens",
        "",
        f"**Command:** `python bench/edge.py --seconds {args.seconds:g} --concurrency {args.concurrency}`.",
        f"**Machine:** {platform.machine()}, {os.cpu_count()} cores shared with other work, Python "
        f"{platform.python_version()}, onnxruntime {__import__('onnxruntime').__version__}, "
        f"{datetime.date.today().isoformat()}.",
        "",
        "**What is timed:** one worker process (`python -m edge.server`, one ONNX Runtime thread, one inference "
        "thread, L1 cache off) serving all-MiniLM-L6-v2 (fp32), driven over gRPC on loopback by closed-loop "
        "clients that send one distinct ~20-token sentence per `Embed`. *batched*: `--max-batch "
        f"{max(levels)} --max-queue-delay-ms 2`; *one at a time*: `--max-batch 1`. *bare ORT*: the same model "
        "in-process, `EmbeddingModel.embed` (tokenize, `session.run`, pool) on batches of as many sentences as "
        "there are clients, no RPC. Figures are embeddings per second.",
        "",
        "| concurrency | one at a time | batched | batched / one | bare ORT (batch = concurrency) | batched / bare |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        one, batched, bare = r["one"][c], r["batched"][c], r["bare"][c]
        lines.append(f"| {c} | {one:.0f} | {batched:.0f} | {batched / one:.2f}x | {bare:.0f} | {batched / bare:.0%} |")
    lines += [
        "",
        "Small LM (`edge-small`, the generated Llama-family checkpoint: hidden 256, 4 layers, GQA 8/2 heads), "
        "the generation loop of `edge.runtime.generation` in-process, one thread, 128 new tokens per request "
        "(temperature 0.8, seeded), KV cache as ONNX inputs/outputs:",
        "",
        "| weights | tokens/s (decode + sample + detokenize) | prefill of a 20-token prompt, ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {p} | {rate:.0f} | {prefill:.2f} |" for p, rate, prefill in lm]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per figure")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--write-docs", action="store_true", help="update the edge section of docs/BENCHMARKS.md")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args()
    section = run(args)
    print(section)
    if args.write_docs:
        record("edge", section, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
