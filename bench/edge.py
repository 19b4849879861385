"""Edge worker throughput: embeddings per second with and without dynamic batching, against a bare
ONNX Runtime session at the same batch sizes, and small-LM tokens per second.

    python bench/edge.py [--seconds 3] [--rounds 3] [--concurrency 1,8,32,64] [--threads 1[,2...]]
                         [--compare-delay-ms 2] [--load-procs 1] [--workers 1] [--model-dir DIR]
                         [--lm-dir DIR | --no-lm]
                         [--write-docs] [--out FILE]

Each served figure is a real worker process (`python -m edge.server`, `--threads` ORT threads, one
inference thread, L1 cache off so every input runs the model) driven over gRPC by closed-loop
clients sending one sentence per Embed request. "bare ORT" runs the same exported model in this
process with `EmbeddingModel.embed` on batches of `concurrency` sentences (tokenize + run + pool, no
RPC). The workers stay up for the whole run and every figure is measured once per round, the rounds
interleaved, so a change in the machine's background load hits every column alike; the table gives
the median. Beside the rates, the CPU time per embedding (worker process + load processes, or the
bare session's process) is measured: it is what batching saves, and what bounds it.

`--model-dir` may name a random-weight build of the same architecture and tokenizer
(`python -m edge.export DEST --random-weights ARCH`, see edge/export.py): throughput does not
depend on the weights' values, and the section says which weights it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine  # noqa: E402  (bench/ is the script's own folder)
from process_cpu import main_thread_cpu, process_cpu  # noqa: E402
from record import record  # noqa: E402

import numpy as np  # noqa: E402

from edge.runtime.embedding import EmbeddingModel  # noqa: E402

EMBED, LM = "all-minilm-l6-v2", "edge-small"
CACHE = Path(os.environ.get("MERIDIAN_CACHE", Path.home() / ".cache" / "meridian")) / "edge"
WORDS = ("edge", "request", "vector", "zone", "latency", "cache", "model", "batch", "user", "cloud",
         "answer", "token", "stream", "gateway", "worker", "drain")
# The targets at concurrency 32.
TARGET_C, TARGET_SPEEDUP, TARGET_OF_BARE = 32, 3.0, 0.85
MODE_TITLES = {"one": "one at a time", "batched": "batched", "bare": "bare ORT"}
def sentence(i: int) -> str:
    """A distinct ~20-token sentence per index, so no two requests are the same input."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12)]
    return f"Sentence {i}: the " + " ".join(words) + f" number {i % 97}."


@dataclass(frozen=True)
class Figure:
    """One measurement: embeddings per second, CPU seconds spent per embedding, and (served) the
    worker's loop thread's CPU seconds per RPC."""

    rate: float
    cpu: float
    loop: float = 0.0


# -- served figures ---------------------------------------------------------------------------------

def start_worker(
    model_dir: Path, port_file: Path, threads: int, *flags: str, workers: int = 1
) -> subprocess.Popen:
    """A worker process on a free loopback port; returns once it reports SERVING."""
    argv = [sys.executable, "-m", "edge.server", "--host", "127.0.0.1", "--port", "0", "--threads", str(threads),
            "--workers", str(workers), "--l1-cache-entries", "0", "--port-file", str(port_file),
            "--model", f"{EMBED}={model_dir}", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("edge worker did not start")
        time.sleep(0.05)
    return proc


def client_share(port: int, clients: int, first: int, start_at: float, seconds: float) -> tuple[float, float]:
    """In a load process: `clients` closed-loop clients; (their calls per second, CPU s) in the window."""
    return asyncio.run(_clients(port, clients, first, start_at, seconds))


async def _clients(port: int, clients: int, first: int, start_at: float, seconds: float) -> tuple[float, float]:
    from grpclib.client import Channel

    from edge.api import edge_pb2
    from edge.api.edge_grpc import EdgeStub

    counter = iter(range(first, 10**12))
    stop_at = start_at + seconds
    async with Channel("127.0.0.1", port) as channel:
        stub = EdgeStub(channel)

        async def client() -> float:
            ends: list[float] = []
            # Calls that end before start_at only warm the worker up; those that end in the window count.
            while time.monotonic() < stop_at:
                await stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=[sentence(next(counter))]), timeout=60)
                if start_at <= (now := time.monotonic()) <= stop_at:
                    ends.append(now)
            # Calls between this client's first and last answer in the window, not answers per window:
            # a batched worker answers in bursts, and a window holds a whole number of them (at
            # concurrency 64, +-1 burst of 3 s is +-20 embeddings/s).
            if len(ends) < 2:
                return len(ends) / seconds
            return (len(ends) - 1) / (ends[-1] - ends[0])

        async def cpu() -> float:
            await asyncio.sleep(start_at - time.monotonic())
            used = time.process_time()
            await asyncio.sleep(stop_at - time.monotonic())
            return time.process_time() - used

        *rates, spent = await asyncio.gather(*(client() for _ in range(clients)), cpu())
    return sum(rates), spent


def embed_rate(pool: ProcessPoolExecutor, procs: int, worker: subprocess.Popen, port: int, concurrency: int,
               seconds: float) -> Figure:
    """Embeddings per second from `concurrency` clients spread over `procs` load processes."""
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    warm = min(1.0, seconds / 3)
    # CLOCK_MONOTONIC is one clock for every process of the machine: all shares count the same window.
    start_at = time.monotonic() + 0.3 + warm
    jobs = [pool.submit(client_share, port, n, i * 10**9, start_at, seconds)
            for i, n in enumerate(shares) if n]
    time.sleep(max(0.0, start_at - time.monotonic()))
    before, loop_before = process_cpu(worker.pid), main_thread_cpu(worker.pid)
    time.sleep(max(0.0, start_at + seconds - time.monotonic()))
    worker_cpu, loop_cpu = process_cpu(worker.pid) - before, main_thread_cpu(worker.pid) - loop_before
    results = [job.result() for job in jobs]
    rate = sum(r for r, _ in results)
    served = max(rate * seconds, 1.0)  # one sentence per RPC
    return Figure(rate, (worker_cpu + sum(c for _, c in results)) / served, loop_cpu / served)


# -- in-process figures -----------------------------------------------------------------------------

def bare_rate(model: EmbeddingModel, batch: int, seconds: float) -> Figure:
    """Embeddings per second of the bare sessions on batches of `batch` distinct sentences: one thread
    per instance of `model`, each on batches of batch / instances (as a worker with that many
    inference threads would split them)."""
    instances = min(len(model.sessions), batch)  # never more sentences in flight than clients
    share = batch // instances
    model.embed([sentence(j) for j in range(share)])
    started, used = time.perf_counter(), time.process_time()

    def run(first: int) -> int:
        i, done = first, 0
        while time.perf_counter() - started < seconds:
            model.embed([sentence(i + j) for j in range(share)])
            i += share
            done += share
        return done

    with ThreadPoolExecutor(instances) as threads:
        done = sum(threads.map(run, [k * 10**9 for k in range(instances)]))
    return Figure(done / (time.perf_counter() - started), (time.process_time() - used) / max(done, 1))


@dataclass(frozen=True)
class Shape:
    """What one batch of the benchmark's sentences costs the model."""

    tokens: float  # real tokens per sentence, [CLS]/[SEP] included (mean)
    padded: float  # tokens per sentence the model runs, padding included (mean, at batch 32)
    flop: float  # FLOPs of one sentence as padded at batch 32 (0.0 when onnx is not installed)
    tokenize_share: float  # tokenization's share of EmbeddingModel.embed at batch 32


def batch_shape(model: EmbeddingModel, model_dir: Path) -> Shape:
    """Token counts, padding, FLOPs per sentence and tokenization cost for batches of 32."""
    real, padded = [], []
    for start in range(0, 32 * 20, 32):
        encodings = model.tokenizer.encode_batch([sentence(start + j) for j in range(32)])
        real += [sum(e.attention_mask) for e in encodings]
        padded += [len(e.ids) for e in encodings]
    texts = [sentence(j) for j in range(32)]
    tokenize = _best_of(lambda: model.tokenizer.encode_batch(texts), 10)
    embed = _best_of(lambda: model.embed(texts), 3)
    length = statistics.mean(padded)
    return Shape(statistics.mean(real), length, model_flop(model_dir, length), tokenize / embed)


def model_flop(model_dir: Path, length: float) -> float:
    """FLOPs of one sequence of `length` tokens: weight MatMuls plus attention's two products."""
    try:
        import onnx
    except ImportError:
        return 0.0
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    per_token, attention = 0, 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        if node.input[1] in weights and len(weights[node.input[1]]) == 2:
            k, n = weights[node.input[1]]
            per_token += 2 * k * n
        else:
            attention += 1
    hidden = json.loads((model_dir / "meta.json").read_text())["hidden_size"]
    # Each activation x activation MatMul (Q.K^T, then P.V) is length x length x hidden per sequence.
    return per_token * length + attention * 2 * length * length * hidden


def gemm_ceiling(threads: int) -> float:
    """GFLOP/s of one large fp32 MatMul (704 x 1536 x 1536) through ORT's kernels: the compute ceiling."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return 0.0
    n, m = 1536, 704
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, n), np.float32)
    seconds = _best_of(lambda: session.run(None, {"x": x}), 20)
    return 2 * m * n * n / seconds / 1e9


def _best_of(call: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls (after one untimed): the figure least hit by other work."""
    call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def lm_rates(lm_dir: Path, seconds: float) -> list[tuple[str, float, float]]:
    """(precision, decode tokens/s, prefill ms of a ~20-token prompt) of the generation loop, one thread."""
    from edge.runtime.generation import GenerateParams, KVCache, SmallLM

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


# -- the run ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """Every figure of one run."""

    levels: list[int]
    # (threads, mode, concurrency) -> one figure per round
    figures: dict[tuple[int, str, int], list[Figure]] = field(default_factory=dict)
    ceiling: dict[int, float] = field(default_factory=dict)  # threads -> GEMM GFLOP/s
    shape: Shape | None = None
    lm: list[tuple[str, float, float]] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average, sampled each round

    def median(self, threads: int, mode: str, c: int) -> float:
        return statistics.median(f.rate for f in self.figures[threads, mode, c])

    def cpu_ms(self, threads: int, mode: str, c: int) -> float:
        return statistics.median(f.cpu for f in self.figures[threads, mode, c]) * 1000

    def loop_ms(self, threads: int, mode: str, c: int) -> float:
        return statistics.median(f.loop for f in self.figures[threads, mode, c]) * 1000

    def cell(self, threads: int, mode: str, c: int) -> str:
        """The median, and half the range over the rounds as a share of it (the run-to-run noise)."""
        values, middle = [f.rate for f in self.figures[threads, mode, c]], self.median(threads, mode, c)
        spread = (max(values) - min(values)) / 2 / middle if len(values) > 1 else 0.0
        return f"{middle:.0f} ±{spread:.0%}"


def run(args: argparse.Namespace) -> Run:
    """Measure everything (rounds interleaved) and return the figures."""
    levels = [int(c) for c in args.concurrency.split(",")]
    result = Run(levels)
    # The load processes start before this process loads any model (spawned, so no ORT threads are copied).
    with ProcessPoolExecutor(args.load_procs, mp_context=get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0.0] * args.load_procs))  # start them now, not inside a measurement
        for threads in args.threads:
            measure_threads(args, result, pool, threads)
    if 1 not in result.ceiling:
        result.ceiling[1] = gemm_ceiling(1)  # the per-core figure the reading needs
    if args.lm_dir is not None:
        result.lm = lm_rates(args.lm_dir, args.seconds)
        for precision, rate, prefill in result.lm:
            print(f"LM {precision}: {rate:.0f} tok/s decode+sample, prefill {prefill:.2f} ms", flush=True)
    return result


def served_modes(args: argparse.Namespace, levels: list[int]) -> dict[str, tuple[str, ...]]:
    """Served mode -> the worker's batching flags."""
    batched = ("--max-batch", str(max(levels)), "--max-queue-delay-ms")
    modes = {"one": ("--max-batch", "1", "--max-queue-delay-ms", "0"),
             "batched": (*batched, f"{args.max_queue_delay_ms:g}")}
    if args.compare_delay_ms is not None:
        modes["delayed"] = (*batched, f"{args.compare_delay_ms:g}")
    return modes


def measure_threads(args: argparse.Namespace, result: Run, pool: ProcessPoolExecutor, threads: int) -> None:
    """The served modes and the bare session at one ORT thread count, over interleaved rounds."""
    modes = served_modes(args, result.levels)
    with tempfile.TemporaryDirectory() as tmp, _workers(args, Path(tmp), threads, modes) as workers:
        model = EmbeddingModel.load(args.model_dir, threads=threads, instances=args.workers)
        if result.shape is None:
            result.shape = batch_shape(model, args.model_dir)
        result.ceiling[threads] = gemm_ceiling(threads)
        print(f"threads={threads}: GEMM ceiling {result.ceiling[threads]:.1f} GFLOP/s", flush=True)
        for r in range(args.rounds):
            result.load.append(os.getloadavg()[0])
            for c in result.levels:
                # Alternate the order of the modes, so that none always runs first after the bare session.
                order = list(workers) if (r + c) % 2 else list(workers)[::-1]
                for mode in order:
                    proc, port = workers[mode]
                    figure = embed_rate(pool, args.load_procs, proc, port, c, args.seconds)
                    result.figures.setdefault((threads, mode, c), []).append(figure)
                result.figures.setdefault((threads, "bare", c), []).append(bare_rate(model, c, args.seconds))
                latest = {m: result.figures[threads, m, c][-1] for m in (*workers, "bare")}
                print(f"threads={threads} round {r + 1}/{args.rounds} c={c:3d}: " + "  ".join(
                    f"{m} {f.rate:7.1f} ({f.cpu * 1e3:.1f} ms cpu)" for m, f in latest.items()), flush=True)


class _workers:
    """One worker per served mode, all running for the block; yields mode -> (process, port)."""

    def __init__(
        self, args: argparse.Namespace, tmp: Path, threads: int, modes: dict[str, tuple[str, ...]]
    ) -> None:
        self.args = args, tmp, threads, modes
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> dict[str, tuple[subprocess.Popen, int]]:
        args, tmp, threads, modes = self.args
        workers = {}
        try:
            for mode, flags in modes.items():
                port_file = tmp / f"{mode}.port"
                self.procs.append(start_worker(args.model_dir, port_file, threads, *flags, workers=args.workers))
                workers[mode] = (self.procs[-1], int(port_file.read_text()))
        except BaseException:
            self.__exit__()
            raise
        return workers

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(30)


# -- the section ------------------------------------------------------------------------------------

def markdown(r: Run, args: argparse.Namespace) -> str:
    """The edge section of docs/BENCHMARKS.md."""
    lines = [
        "## Edge worker: embeddings with dynamic batching, small-LM tokens",
        "",
        f"**Command:** `python bench/edge.py {' '.join(args.argv)}`.",
        f"**Machine:** {machine()}, Python {platform.python_version()}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, {datetime.date.today().isoformat()}; 1-minute load average "
        f"{min(r.load):.1f}–{max(r.load):.1f} over the rounds (this run's own processes included).",
        f"**Model:** `{args.model_dir}` ({model_weights(args.model_dir)}).",
        "",
        "**What is timed:** one worker process (`python -m edge.server`, ORT intra-op threads as in each table, "
        f"{args.workers} inference thread(s) with an ORT session each, L1 cache off) serving all-MiniLM-L6-v2 "
        "(fp32), driven over gRPC on loopback by closed-loop "
        f"clients in {args.load_procs} load process(es), each client sending one distinct ~20-token sentence per "
        f"`Embed`. *batched*: `--max-batch {max(r.levels)} --max-queue-delay-ms {args.max_queue_delay_ms:g}`; "
        "*one at a time*: `--max-batch 1`" + (f"; *batched, with delay*: the same with `--max-queue-delay-ms "
                                              f"{args.compare_delay_ms:g}`" if args.compare_delay_ms is not None
                                              else "") + ". *bare ORT*: the same model in the "
        "bench process, `EmbeddingModel.embed` (tokenize, `session.run`, pool) on batches of as many sentences as "
        "there are clients (split evenly over one thread per session when there are several), no RPC. "
        "The workers stay up; each figure is measured for "
        f"{args.seconds:g} s once per round, {args.rounds} rounds interleaved, and the table gives the median ± half "
        "the range over the rounds, in embeddings per second. *CPU ms per embedding*: CPU time of the worker "
        "process and the load processes (bare: of the bench process) over the embeddings they served.",
    ]
    extra = ["delayed"] if args.compare_delay_ms is not None else []
    titles = {**MODE_TITLES, "delayed": f"batched, delay {args.compare_delay_ms or 0:g} ms"}
    for threads in args.threads:
        lines += ["", f"ORT intra-op threads: **{threads}**", "",
                  "| concurrency | one at a time | batched | batched / one | bare ORT (batch = concurrency) "
                  "| batched / bare |" + "".join(f" {titles[m]} |" for m in extra)
                  + " CPU ms per embedding: one / batched / bare |",
                  "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|"]
        for c in r.levels:
            one, batched, bare = (r.median(threads, m, c) for m in ("one", "batched", "bare"))
            cells = {m: r.cell(threads, m, c) for m in ("one", "batched", "bare", *extra)}
            cpu = " / ".join(f"{r.cpu_ms(threads, m, c):.1f}" for m in ("one", "batched", "bare"))
            lines.append(f"| {c} | {cells['one']} | {cells['batched']} | {batched / one:.2f}x | {cells['bare']} | "
                         f"{batched / bare:.0%} |" + "".join(f" {cells[m]} |" for m in extra) + f" {cpu} |")
    lines += ["", *reading(r, args)]
    if r.lm:
        lines += [
            "",
            "Small LM (`edge-small`, the generated Llama-family checkpoint: hidden 256, 4 layers, GQA 8/2 heads), "
            "the generation loop of `edge.runtime.generation` in-process, one thread, 128 new tokens per request "
            "(temperature 0.8, seeded), KV cache as ONNX inputs/outputs:",
            "",
            "| weights | tokens/s (decode + sample + detokenize) | prefill of a 20-token prompt, ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {p} | {rate:.0f} | {prefill:.2f} |" for p, rate, prefill in r.lm]
    if quality := int8_quality(args):
        lines += ["", quality]
    return "\n".join(lines)


def int8_quality(args: argparse.Namespace) -> str:
    """What the exports' meta.json record of their int8 variants' measured quality (gated at build time)."""
    parts = []
    embed = json.loads((args.model_dir / "meta.json").read_text()).get("int8")
    if embed:
        parts.append(f"embeddings min cosine to fp32 {embed['min_cosine_to_fp32']:.4f} over {embed['sentences']} "
                     f"fixed sentences (gate {embed['gate']}; {embed['fp32_matmuls']} feed-forward MatMuls stay fp32)")
    if args.lm_dir is not None and (lm := json.loads((args.lm_dir / "meta.json").read_text()).get("int8")):
        parts.append(f"LM top-1 agreement with fp32 {lm['top1_agreement']:.1%} over {lm['prompts']} prompts × "
                     f"{lm['tokens_per_prompt']} teacher-forced tokens (gate {lm['gate']:.0%})")
    if not parts:
        return ""
    return "int8 quality (measured at build time, recorded in each export's `meta.json`, gated): " + "; ".join(parts) + "."


def reading(r: Run, args: argparse.Namespace) -> Iterator[str]:
    """The figures read against the issue's targets, with the compute ceiling worked out."""
    shape = r.shape
    assert shape is not None
    yield (f"**Inputs:** {shape.tokens:.1f} real tokens per sentence, {shape.padded:.1f} as padded in a batch of 32 "
           f"({1 - shape.tokens / shape.padded:.0%} padding); tokenization is {shape.tokenize_share:.1%} of "
           "`embed` at batch 32" + (f"; {shape.flop / 1e9:.3f} GFLOP per sentence (weight MatMuls + attention)."
                                      if shape.flop else "."))
    if TARGET_C not in r.levels:
        return
    # The fairest one-at-a-time figure is its best over the thread counts measured.
    best_one = max(r.median(t, "one", TARGET_C) for t in args.threads)
    for threads in args.threads:
        yield ""
        yield reading_for(r, threads, best_one, args.workers)


def reading_for(r: Run, threads: int, best_one: float, sessions: int = 1) -> str:
    """One thread count's figures against the targets, and what bounds them (`sessions` sessions of
    `threads` ORT threads each)."""
    shape, c = r.shape, TARGET_C
    assert shape is not None
    one, batched, bare = (r.median(threads, m, c) for m in ("one", "batched", "bare"))
    text = (f"**Reading, {threads} thread(s), against the issue's targets at concurrency {c}:** batched is "
            f"{batched / bare:.0%} of bare ORT (target ≥ {TARGET_OF_BARE:.0%}: "
            f"{'met' if batched / bare >= TARGET_OF_BARE else 'NOT met'}) and {batched / one:.2f}x one at a time "
            f"(target ≥ {TARGET_SPEEDUP:g}x: {'met' if batched / one >= TARGET_SPEEDUP else 'NOT met'}).")
    text += _lone_request(r, threads)
    text += (f" Batching cuts the CPU per embedding from {r.cpu_ms(threads, 'one', c):.1f} ms to "
             f"{r.cpu_ms(threads, 'batched', c):.1f} ms.")
    text += _turns(r.loop_ms(threads, "batched", c), c, bare)
    ceiling, per_core, flop = r.ceiling.get(threads, 0.0), r.ceiling.get(1, 0.0), shape.flop
    if not (flop and ceiling and per_core):
        return text
    b1 = r.median(threads, "bare", r.levels[0])
    bmax = max(r.median(threads, "bare", level) for level in r.levels)
    # Two bounds on any batcher, both generous: ORT's threads each at one core's GEMM ceiling (perfect
    # scaling), and every core of the machine paying only the model's floor (its FLOPs at that ceiling)
    # plus the serving path's own CPU per embedding as measured.
    floor_ms = flop / (per_core * 1e9) * 1000
    serving_ms = max(0.0, r.cpu_ms(threads, "batched", c) - r.cpu_ms(threads, "bare", c))
    bound = min(threads * sessions * per_core * 1e9 / flop, (os.cpu_count() or 1) * 1000 / (floor_ms + serving_ms))
    text += (f" **Ceiling:** the model runs at {b1 * flop / 1e9:.0f} GFLOP/s at batch {r.levels[0]} and at most "
             f"{bmax * flop / 1e9:.0f} GFLOP/s batched (bare), against {ceiling:.0f} GFLOP/s for one large MatMul "
             f"through the same kernels on {threads} thread(s) ({per_core:.0f} on one): at least {floor_ms:.1f} ms "
             f"of a core per sentence. Add the {serving_ms:.1f} ms of serving CPU per embedding measured here (RPC, "
             f"batching, load generator) and no batcher can serve more than ≈ {bound:.0f} embeddings/s on "
             f"{os.cpu_count()} cores, {bound / best_one:.2f}x the best one-at-a-time figure ({best_one:.0f}): ")
    if bound / best_one < TARGET_SPEEDUP:
        text += f"{TARGET_SPEEDUP:g}x is out of reach on this machine by arithmetic alone, whatever the batcher does."
    else:
        text += f"arithmetic alone does not rule {TARGET_SPEEDUP:g}x out here."
    return text


def _lone_request(r: Run, threads: int) -> str:
    """What batching costs a request alone (when concurrency 1 was measured)."""
    if r.levels[0] != 1:
        return ""
    one1, batched1 = r.median(threads, "one", 1), r.median(threads, "batched", 1)
    lone = ("a lone request runs at once, as it would without batching" if batched1 / one1 >= 0.95 else
            "a lone request still pays for batching")
    return (f" At concurrency 1 batched serves {batched1:.0f} against one-at-a-time's {one1:.0f} "
            f"({batched1 / one1:.2f}x): {lone}.")


def _turns(loop_ms: float, c: int, bare: float) -> str:
    """The bound of a closed loop of c clients: they send their next c requests only once this
    batch's answers are out, so the model's turn (a batch of c at bare's rate) and the loop's (c RPCs)
    follow each other."""
    if loop_ms <= 0:
        return ""
    turns = c / (c / bare + c * loop_ms / 1000)
    return (f" **Turns:** the worker's loop thread spends {loop_ms:.2f} ms of CPU per RPC; with {c} clients in "
            f"a closed loop the model's turn ({c / bare * 1000:.0f} ms for a batch of {c} at bare's rate) and the "
            f"loop's ({c} RPCs, {c * loop_ms:.0f} ms) follow each other, which bounds the batched worker near "
            f"{turns:.0f}/s, {turns / bare:.0%} of bare.")


def model_weights(model_dir: Path) -> str:
    """"real weights" or what meta.json says about generated ones."""
    meta = json.loads((model_dir / "meta.json").read_text())
    weights = meta.get("weights")
    if not weights:
        return "all-MiniLM-L6-v2's weights"
    return f"{weights}, the architecture and tokenizer of all-MiniLM-L6-v2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per figure and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table gives the median")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--threads", default="1", help="ORT intra-op threads, comma-separated: one table each")
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="the batched worker's queue delay")
    p.add_argument("--compare-delay-ms", type=float, metavar="MS",
                   help="also serve batched with --max-queue-delay-ms MS, in a column of its own")
    p.add_argument("--load-procs", type=int, default=1, help="processes the clients are spread over")
    p.add_argument("--workers", type=int, default=1, help="inference threads (one ORT session each) per worker")
    p.add_argument("--model-dir", type=Path, default=CACHE / EMBED, help="exported embedding model folder")
    p.add_argument("--lm-dir", type=Path, default=CACHE / LM, help="exported small LM folder")
    p.add_argument("--no-lm", action="store_true", help="skip the small-LM figures")
    p.add_argument("--write-docs", action="store_true", help="update the edge section of docs/BENCHMARKS.md")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument("--out", type=Path, help="also write the section to this file")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.model_dir = args.model_dir.expanduser().resolve()
    if args.no_lm:
        args.lm_dir = None
    section = markdown(run(args), args)
    print(section)
    if args.out is not None:
        args.out.write_text(section + "\n")
    if args.write_docs:
        record("edge", section, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
