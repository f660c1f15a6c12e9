"""The MindSpore scheduler's port is chosen by test-binding the address the scheduler
binds (its MS_SCHED_HOST, the first agent's Ray node address), not 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from launcher.agent import NodeAgent


def test_free_ports_are_free_on_the_given_address():
    agent = NodeAgent("j-port", 1, 0, standby=False)
    ports = agent.free_ports(2, "127.0.0.2")
    assert len(set(ports)) == 2
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.2", port))


def test_an_address_the_node_lacks_fails_the_choice_not_the_scheduler():
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine. A choice made on
    # 127.0.0.1 would hand back a port the scheduler then cannot bind.
    agent = NodeAgent("j-port", 1, 0, standby=False)
    with pytest.raises(OSError):
        agent.free_ports(1, "192.0.2.1")

