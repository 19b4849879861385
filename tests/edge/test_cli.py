"""The worker's command line: flags, the environment, and a zone's entry in a topology file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.server import parse_args

TOPOLOGY = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"


def test_topology_gives_the_zone_address_port_models_threads_and_batching(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    edge = ("edge: {port: 50051, threads: 2, workers: 3, max_batch: 8, max_queue_delay_ms: 4, "
            "l1_cache_entries: 10}")
    topo.write_text(TOPOLOGY.read_text().replace("edge: {port: 50051, threads: 1}", edge, 1))
    config = parse_args(["--topology", str(topo), "--zone", "zone-a"], {"MERIDIAN_CACHE": "/models"})
    assert (config.host, config.port, config.zone) == ("127.0.1.1", 50051, "zone-a")
    assert config.models == {"all-minilm-l6-v2": Path("/models/edge/all-minilm-l6-v2"),
                             "edge-small": Path("/models/edge/edge-small")}
    assert (config.max_batch, config.max_queue_delay_ms, config.l1_cache_entries) == (8, 4, 10)
    assert (config.threads, config.workers) == (2, 3)


def test_environment_then_flags_override_the_topology() -> None:
    env = {"MERIDIAN_TOPOLOGY": str(TOPOLOGY), "MERIDIAN_ZONE": "zone-b", "MERIDIAN_EDGE_HOST": "0.0.0.0",
           "MERIDIAN_EDGE_INT8": "1"}
    config = parse_args(["--port", "6000", "--max-batch", "4"], env)
    assert (config.zone, config.host, config.port, config.max_batch, config.int8) == ("zone-b", "0.0.0.0", 6000, 4, True)


def test_plain_flags_still_work_without_a_topology() -> None:
    config = parse_args(["--model", "m=/x", "--max-batch", "1", "--l1-cache-entries", "0"], {})
    assert config.models == {"m": Path("/x")} and config.max_batch == 1 and config.l1_cache_entries == 0


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        ([], {}, "no models"),
        (["--topology", str(TOPOLOGY)], {}, "--zone"),
        (["--topology", str(TOPOLOGY), "--zone", "zone-z"], {}, "zone-z"),
        (["--model", "m=/x", "--max-batch", "0"], {}, "max_batch"),
    ],
)
def test_bad_settings_exit_with_a_message(argv: list[str], env: dict, fragment: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, env)
    assert fragment in capsys.readouterr().err
