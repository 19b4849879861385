"""The `meridian` command: up, down, models, and the entry points of each process."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from deploy.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `meridian` console script."""
    argv = sys.argv[1:] if argv is None else argv
    # Process entry points take their own flags.
    if argv and argv[0] == "gateway":
        from gateway.server import main as gateway_main

        return gateway_main(argv[1:])
    if argv and argv[0] == "edge":
        from edge.server import main as edge_main

        return edge_main(argv[1:])
    if argv and argv[0] == "proxy":
        from deploy.drills.proxy import main as proxy_main

        return proxy_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meridian", description="Meridian: edge-to-cloud inference serving.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack locally (Ctrl-C stops it)")
    _stack_flags(up)
    up.add_argument("--core-model", help="serve this Hugging Face checkpoint directory in every zone's core")
    up.add_argument("--detach", action="store_true", help="return once ready; logs under var/logs")
    up.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for readiness")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop a stack started with `meridian up`")
    _stack_flags(down)
    down.set_defaults(func=cmd_down)

    models = sub.add_parser("models", help="build the model artefacts into the cache (skipped when built)")
    models.add_argument("--force", action="store_true", help="rebuild even when built")
    models.set_defaults(func=cmd_models)

    drill = sub.add_parser("drill", help="failover drill: local stack behind fault proxies, load, one fault, a report")
    drill.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                       help="kill-zone, blackhole-zone, slow-zone, restart-core, kill-redis, zone-returns, kill-replica, "
                            "kill-core-replica, freeze-replica, freeze-core-replica")
    drill.add_argument("--topology", help="topology YAML (default: deploy/local.yaml)")
    drill.add_argument("--out", help="report folder (default: var/drills/<time>)")
    drill.add_argument("--before", type=float, default=4.0, help="seconds of load before the fault")
    drill.add_argument("--during", type=float, default=5.0, help="seconds the fault lasts")
    drill.add_argument("--after", type=float, default=4.0, help="seconds of load after the fault")
    drill.add_argument("--embed-rate", type=float, default=10.0, help="embeddings per second")
    drill.add_argument("--complete-rate", type=float, default=1.0, help="completions per second")
    drill.add_argument("--stream-rate", type=float, default=1.0, help="streamed completions per second")
    drill.set_defaults(func=cmd_drill)

    core = sub.add_parser("core", help="serve one checkpoint with a Triton server in the foreground (a zone's core)")
    core.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    core.add_argument("--name", help="model name (default: the directory's name)")
    core.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    core.add_argument("--dtype", default=None, help="float32, bf16 or fp16 (default: bf16 on cuda, float32 on cpu)")
    core.add_argument("--threads", type=int, default=2)
    core.add_argument("--host", default="127.0.0.1")
    core.add_argument("--grpc-port", type=int, default=8001)
    core.add_argument("--http-port", type=int, default=8000)
    core.add_argument("--metrics-port", type=int, default=8002)
    core.add_argument("--workdir", default="var/core", help="where the model repository is written")
    core.set_defaults(func=cmd_core)

    sub.add_parser("proxy", help="run a fault-injection proxy (see `meridian proxy --help`)")
    sub.add_parser("gateway", help="run the gateway process (see `meridian gateway --help`)")
    sub.add_parser("edge", help="run an edge worker process (see `meridian edge --help`)")
    return p


def _stack_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", help="topology YAML (default: deploy/local.yaml)")
    p.add_argument("--var-dir", default="var", help="run state and logs (default: ./var)")


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack in the foreground, or in the background with --detach."""
    from deploy import launcher

    settings = Settings.resolve(topology=args.topology, var_dir=args.var_dir, core_model=args.core_model)
    pid = launcher.running_supervisor(settings)
    if pid is not None:
        print(f"error: a stack is already running (pid {pid}); stop it with `meridian down`", file=sys.stderr)
        return 1
    try:
        topology = launcher.resolve_topology(settings)
        stack = launcher.LocalStack(settings, topology)
        stack._check_artefacts()
        launcher.check_ports(topology)
    except Exception as exc:  # noqa: BLE001 - a clear CLI message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.detach:
        return _detach(args, settings)
    print(f"Starting Meridian ({len(topology.zones)} zones) from {settings.topology} ...", flush=True)
    return launcher.supervise(settings, stack, progress=lambda m: print(m, flush=True), timeout=args.timeout)


def _detach(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import launcher

    settings.log_dir.mkdir(parents=True, exist_ok=True)
    launcher.state_path(settings).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "deploy.cli", "up", "--var-dir", str(settings.var_dir), "--timeout", str(args.timeout)]
    if args.topology:
        argv += ["--topology", args.topology]
    if args.core_model:
        argv += ["--core-model", args.core_model]
    env = {**os.environ, "MERIDIAN_API_KEY": settings.api_key}
    with open(settings.log_dir / "launcher.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + args.timeout + 30
    print("Starting Meridian in the background ...", flush=True)
    while time.monotonic() < deadline:
        state = launcher.read_state(settings) or {}
        ours = state.get("pid") == proc.pid
        if ours and state.get("status") == "ready":
            stack = launcher.LocalStack(settings, launcher.resolve_topology(settings))
            print(stack.banner())
            print("Stop it with `meridian down`.")
            return 0
        if ours and state.get("status") == "stopped":
            print(f"error: stopped during startup; see {settings.log_dir}/launcher.log", file=sys.stderr)
            return 1
        if proc.poll() is not None or state.get("status") == "failed":
            print(f"error: {state.get('error') or 'the launcher exited'}; see {settings.log_dir}/launcher.log",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    print(f"error: not ready in time; see {settings.log_dir}", file=sys.stderr)
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the supervisor of this var dir and every process it started."""
    from deploy import launcher

    settings = Settings.resolve(topology=args.topology, var_dir=args.var_dir)
    pid = launcher.running_supervisor(settings)
    if pid is None:
        print("no stack is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    # Re-check identity, not just the pid: once ours exits, the pid may belong to anyone.
    while time.monotonic() < deadline:
        if launcher.running_supervisor(settings) != pid:
            print("stopped")
            return 0
        time.sleep(0.2)
    if launcher.running_supervisor(settings) == pid:
        os.kill(pid, signal.SIGKILL)
    print("stopped (killed after 60 s)")
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    """Run failover drills and report."""
    from deploy.drills.load import Rates
    from deploy.drills.runner import Timing, main as drill_main

    timing = Timing(args.before, args.during, args.after)
    rates = Rates(args.embed_rate, args.complete_rate, args.stream_rate)
    return drill_main(args.scenarios, args.out, timing, rates, args.topology)


def cmd_core(args: argparse.Namespace) -> int:
    """Write a model repository for one checkpoint and exec tritonserver on it."""
    from pathlib import Path

    from core.model.config import check_checkpoint
    from core.triton.repository import CoreModelSpec, write_model_repository
    from core.triton.server import TritonServerSpec, remove_stale_shm_regions, tritonserver_command

    checkpoint = Path(args.checkpoint).resolve()
    try:  # here, in one line, rather than from inside Triton's model load after it started
        check_checkpoint(checkpoint)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "float32")
    work = Path(args.workdir).resolve()
    spec = CoreModelSpec(name=args.name or checkpoint.name, checkpoint=checkpoint, device=args.device, dtype=dtype,
                         threads=args.threads)
    repo = write_model_repository(work / "models", [spec])
    server = TritonServerSpec(
        repository=repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, backend_dir=work / "backends",
    )
    argv, env = tritonserver_command(server)
    remove_stale_shm_regions(server)  # a container restarted in place keeps its /dev/shm
    os.execve(argv[0], argv, env)
    return 0  # not reached


def cmd_models(args: argparse.Namespace) -> int:
    """Build every artefact the local topology needs; each step is skipped when built."""
    from deploy.models import build_all

    return build_all(Settings.resolve(), force=args.force)


if __name__ == "__main__":
    sys.exit(main())
