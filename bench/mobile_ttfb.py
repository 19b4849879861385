"""Time to first byte of a completion through a lossy, high-latency link: the mobile SDK's three ways in.

    python bench/mobile_ttfb.py [--rounds 40] [--rtt-ms 100] [--loss 0.02] [--write-docs]

Starts the local stack (as the tests do: own ports, own var dir) unless `--https-port/--h3-port/
--cert/--api-key` point at a running one, puts the fault-injection proxy in front of it (UDP to the
HTTP/3 port, TCP to the HTTPS/1.1 port; half the round trip each way, loss on UDP), warms the
gateway's cache with the measured request, then per round, in shuffled order, with a fresh client
each time (a cold app start):

- `https1-new`: HTTPS/1.1 on a new TCP+TLS connection;
- `h3-new`: HTTP/3 on a new QUIC connection (no ticket);
- `h3-0rtt`: HTTP/3 resumed from the ticket the previous connection left on disk, the request
  sent as 0-RTT data (the app opted in to automatic idempotency keys, so it is replay-safe).

TTFB = from the `create()` call (no connection open) to the first streamed chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import record  # noqa: E402  (bench/ is the script's own folder)

import aioquic  # noqa: E402

import mobile  # noqa: E402
from deploy.drills.faults import Fault  # noqa: E402
from deploy.drills.proxy import FaultState, Forward, start_forwards  # noqa: E402

MODEL = "meridian-moe-mini"
REQUEST = dict(model=MODEL, prompt="The phone said", max_tokens=16, temperature=0, stream=True)
MODES = ("https1-new", "h3-new", "h3-0rtt")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalStack:
    """`meridian up --detach` on free ports in a temp folder, `meridian down` after."""

    def __enter__(self) -> LocalStack:
        import yaml

        from deploy.settings import DEFAULT_TOPOLOGY

        self.var = Path(tempfile.mkdtemp(prefix="mobile-bench-"))
        topo = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
        topo["gateway"]["http1"]["port"] = free_port(socket.SOCK_STREAM)
        topo["gateway"]["http3"]["port"] = free_port(socket.SOCK_DGRAM)
        topo["gateway"]["https"]["port"] = free_port(socket.SOCK_STREAM)
        topo["redis"]["port"] = free_port(socket.SOCK_STREAM)
        for i, zone in enumerate(topo["zones"]):
            zone["address"] = f"127.0.{61 + i}.1"
        (self.var / "topology.yaml").write_text(yaml.safe_dump(topo))
        self.api_key = "mk-bench-" + "y" * 16
        self.env = {**os.environ, "MERIDIAN_API_KEY": self.api_key}
        self._cli("up", "--detach", "--topology", str(self.var / "topology.yaml"), "--var-dir", str(self.var))
        self.h3_port, self.https_port = topo["gateway"]["http3"]["port"], topo["gateway"]["https"]["port"]
        self.cert = self.var / "tls" / "cert.pem"
        return self

    def _cli(self, *args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "deploy.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"meridian {args[0]} failed:\n{done.stdout}\n{done.stderr}")

    def __exit__(self, *exc) -> None:
        self._cli("down", "--var-dir", str(self.var))


async def ttfb(client: mobile.Client) -> tuple[float, bool]:
    """Seconds to the first chunk, and whether the request went as 0-RTT data."""
    start = time.perf_counter()
    stream = await client.completions.create(**REQUEST)
    async for chunk in stream:
        if chunk.text or chunk.choices:
            elapsed = time.perf_counter() - start
            break
    else:
        raise RuntimeError("empty stream")
    await stream.aclose()
    return elapsed, stream.meta.early_data


async def measure(args, https_port: int, h3_port: int, cert: str, api_key: str) -> dict[str, list]:
    """Samples per mode through the proxy."""
    udp, tcp = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    fault = Fault(latency_ms=args.rtt_ms / 2, loss=args.loss)
    state = FaultState(fault, seed=args.seed)
    opened = await start_forwards(state, [Forward("udp", ("127.0.0.1", udp), ("127.0.0.1", h3_port)),
                                          Forward("tcp", ("127.0.0.1", tcp), ("127.0.0.1", https_port))])
    tickets = Path(tempfile.mkdtemp(prefix="mobile-bench-tickets-"))
    common = dict(api_key=api_key, ca_file=cert, migration_check_s=None, h3_port=udp,
                  retry=mobile.RetryPolicy(max_attempts=1), timeouts=mobile.Timeouts(handshake_s=5, request_s=30))
    url = f"https://127.0.0.1:{tcp}"
    clients = {
        "https1-new": lambda: mobile.Client(url, http3=False, **common),
        "h3-new": lambda: mobile.Client(url, http1=False, **common),
        "h3-0rtt": lambda: mobile.Client(url, http1=False, ticket_dir=tickets, auto_idempotency_key=True, **common),
    }
    try:
        # Warm the gateway's cache (temperature 0 answers are cached) and leave a ticket on disk.
        async with clients["h3-0rtt"]() as c:
            await ttfb(c)
            await asyncio.sleep(0.3)
        samples: dict[str, list] = {m: [] for m in MODES}
        early = 0
        rng = random.Random(args.seed)
        for _ in range(args.rounds):
            for mode in rng.sample(MODES, len(MODES)):
                client = clients[mode]()
                try:
                    seconds, was_early = await ttfb(client)
                    samples[mode].append(seconds)
                    early += mode == "h3-0rtt" and was_early
                    if mode == "h3-0rtt":
                        await asyncio.sleep(args.rtt_ms / 1000 * 2)  # let the next ticket arrive and be saved
                except mobile.MeridianError as exc:
                    samples[mode].append(None)
                    print(f"{mode}: failed: {exc}", file=sys.stderr)
                finally:
                    await client.aclose()
        samples["_early"] = [early]
        return samples
    finally:
        for item in opened:
            item.close()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def table(samples: dict[str, list]) -> tuple[str, dict]:
    """The Markdown rows and the figures."""
    base = statistics.median(v for v in samples["https1-new"] if v is not None)
    figures, rows = {}, ["| mode | median ms | p90 ms | median vs HTTPS/1.1 new | ok / runs |", "|---|---:|---:|---:|---:|"]
    names = {"https1-new": "HTTPS/1.1, new TCP+TLS connection", "h3-new": "HTTP/3, new QUIC connection",
             "h3-0rtt": "HTTP/3, resumed, request as 0-RTT"}
    for mode in MODES:
        ok = [v for v in samples[mode] if v is not None]
        med, p90 = statistics.median(ok), pct(ok, 0.9)
        figures[mode] = (med, p90)
        rows.append(f"| {names[mode]} | {med * 1000:.1f} | {p90 * 1000:.1f} | {med / base:.2f}x "
                    f"({(1 - med / base) * 100:+.0f}% cut) | {len(ok)} / {len(samples[mode])} |".replace("+-", "-"))
    return "\n".join(rows), figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--rtt-ms", type=float, default=100.0)
    p.add_argument("--loss", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--https-port", type=int)
    p.add_argument("--h3-port", type=int)
    p.add_argument("--cert")
    p.add_argument("--api-key")
    p.add_argument("--write-docs", action="store_true", help="update the mobile section of docs/BENCHMARKS.md")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args()
    if args.https_port:
        samples = asyncio.run(measure(args, args.https_port, args.h3_port, args.cert, args.api_key))
    else:
        with LocalStack() as s:
            samples = asyncio.run(measure(args, s.https_port, s.h3_port, str(s.cert), s.api_key))
    rows, figures = table(samples)
    early = samples["_early"][0]
    cut = 1 - figures["h3-0rtt"][0] / figures["https1-new"][0]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.system()} {platform.release()}"
    section = f"""## Mobile SDK: time to first byte on a lossy 100 ms link

**Command:** `python bench/mobile_ttfb.py --rounds {args.rounds} --rtt-ms {args.rtt_ms:g} --loss {args.loss:g} --write-docs`
**Machine:** {machine}; Python {platform.python_version()}, aioquic {aioquic.__version__}; {datetime.date.today().isoformat()}.

**What is timed:** `mobile.Client.completions.create(stream=True)` of `{MODEL}` (16 tokens, temperature 0,
so the gateway answers from its L2 cache and the figure is the network's), from the call, with no
connection open, to the first streamed chunk. A fresh client per sample (a cold app start), modes
interleaved in shuffled order, {args.rounds} rounds. Link: the fault-injection proxy
(`deploy/drills/proxy.py`) with {args.rtt_ms / 2:g} ms each way and {args.loss:.0%} loss; loss applies to UDP only
(TCP would retransmit in the kernel). {early} of {len([v for v in samples['h3-0rtt'] if v is not None])} resumed requests went as 0-RTT data.

{rows}

Resumed HTTP/3 cuts the median TTFB by **{cut:.0%}** against a new HTTPS/1.1 connection. Round trips
on this path: HTTPS/1.1 pays 3 (TCP handshake, TLS 1.3, request; the proxy holds a new connection's
first bytes for one round trip, as the SYN/SYN-ACK exchange would), new HTTP/3 pays 2 and resumed
HTTP/3 1, so the ideal cut is 67%; the rest is the CPU cost of QUIC in Python at both ends (aioquic
client and gateway; TLS over TCP runs in OpenSSL's C). The p90 of the QUIC rows carries the 2% UDP
loss (a lost handshake datagram costs a probe timeout); TCP's loss is not modelled."""
    print(section)
    if args.write_docs:
        record("mobile_ttfb", section, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
