"""The rendezvous port: the same for every task of a job, outside the ephemeral range."""

from __future__ import annotations

from pathlib import Path

from pemt.distributed import RENDEZVOUS_PORTS, rendezvous_port


def test_port_is_stable_per_job_and_below_ephemeral_ports() -> None:
    low, high = RENDEZVOUS_PORTS
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {rendezvous_port(str(job)) for job in range(2000)}
    assert all(low <= p <= high < ephemeral_low for p in ports)
    assert rendezvous_port("12345_7") == rendezvous_port("12345_7")
    assert len(ports) > 1500, "different jobs rarely share a port"
