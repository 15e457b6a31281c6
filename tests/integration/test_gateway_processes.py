"""`python -m producer serve --workers 2`: two uvicorn processes behind one port, and /metrics
that sums them, whichever of them answers the scrape."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet_fixtures import wait_until
from tests.gateway_fixtures import GatewayProcess

pytestmark = pytest.mark.integration


def healthz_answered(metrics_text: str) -> float:
    """fleet_gateway_requests_total{route="/healthz",status="200"} in one scrape."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "fleet_gateway_requests_total" and sample.labels == {
                "route": "/healthz",
                "status": "200",
            }:
                return sample.value
    return 0.0


def recording_pids(folder: Path) -> set[int]:
    """The processes that wrote counters into the multiprocess folder (counter_<pid>.db)."""
    return {int(f.stem.rpartition("_")[2]) for f in folder.glob("counter_*.db")}


def test_metrics_of_a_gateway_with_two_processes_count_the_requests_of_both(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    # A PROMETHEUS_MULTIPROC_DIR shared with others, as a host may give it: the gateway makes
    # a folder of its own inside it and serves only that.
    shared = tmp_path / "prometheus"
    (shared / "someone-else").mkdir(parents=True)
    gw = start_gateway(
        "two-processes", args=("--workers", "2"), PROMETHEUS_MULTIPROC_DIR=str(shared)
    )
    assert gw.proc is not None
    own = wait_until(lambda: [d for d in shared.glob("fleet-gateway-*") if d.is_dir()], 30,
                     "the gateway's own metrics folder")[0]  # fmt: skip
    children = {p.pid for p in psutil.Process(gw.proc.pid).children()}
    # One request a connection until both processes have answered some (the kernel hands each
    # new connection to whichever process accepts first).
    sent = 0

    def both_answered() -> bool:
        nonlocal sent
        assert httpx.get(gw.url + "/healthz", timeout=10).status_code == 200
        sent += 1
        return len(recording_pids(own) & children) == 2

    wait_until(both_answered, 120, "both gateway processes answered a request", interval=0.01)
    # The start-up wait's one 200 counts too. Every scrape, on a new connection each and so
    # answered by either process, sees the requests of both.
    seen = [healthz_answered(httpx.get(gw.url + "/metrics", timeout=10).text) for _ in range(12)]
    assert seen == [sent + 1] * 12, (sent, seen)
    gw.stop()
    assert not own.exists()  # removed at exit; the shared folder and the others' stay
    assert (shared / "someone-else").is_dir()
