"""Finding or starting the Ray cluster the CLI talks to.

`fleet up` starts a small daemon (`python -m launcher.local serve`) that owns
a local Ray head on 127.0.0.1 and the controller; `fleet down` stops exactly
that daemon by its pid (never `ray stop`, which would kill every Ray on the
machine). Other clients connect to the address the daemon writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Must be set before `import ray` (read into a constant at import): keeps Ray on
# 127.0.0.1 instead of the host's primary address (loopback-only machines, and
# no port exposed to the network by default).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LOCAL_STATE = "local-cluster.json"
DEFAULT_NPUS = 8
# Bounds on reaching a cluster. Ray's own ray.init retries a dead GCS for minutes, so the
# CLI first opens a plain TCP connection to the GCS port, then runs ray.init under a limit.
PROBE_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_ENV = "FLEET_CONNECT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 30.0
# How long a signal can wait for the main thread while it waits on ray.init.
SIGNAL_POLL_S = 0.1


def connect_timeout() -> float:
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else CONNECT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


class _NoNpuTypeTraceback(logging.Filter):
    # Ray probes CANN's `acl` module for the NPU type and logs a full traceback
    # when it is missing - expected on a CPU stand-in node, alarming to a newcomer.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to detect NPU type" not in record.getMessage()


class _NoThreadSigtermWarning(logging.Filter):
    # ray.init runs in a helper thread (to bound it), so Ray says it set no SIGTERM
    # handler; the CLI installs its own in the main thread.
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def quiet_ray() -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logging.getLogger("ray._private.accelerators.npu").addFilter(_NoNpuTypeTraceback())
    logging.getLogger("ray._private.worker").addFilter(_NoThreadSigtermWarning())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def fleet_home() -> Path:
    return Path(os.environ.get("FLEET_HOME") or Path.home() / ".fleet").expanduser()


def _state_path(home: Path) -> Path:
    return home / LOCAL_STATE


def _token_path(home: Path) -> Path:
    return home / "ray-auth-token"


def use_local_token(home: Path, create: bool = False) -> None:
    """Point Ray's token auth at this home's own token (0600 file, never printed).

    Ray's default token lives in ~/.ray and is shared by every Ray on the
    machine; a per-home token keeps `fleet up` clusters separate and lets
    clients connect by explicit address (Ray only loads the default token for
    address=None/"auto").
    """
    p = _token_path(home)
    if create and not p.exists():
        import secrets
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if p.exists():
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(p)
        os.environ.pop("RAY_AUTH_TOKEN", None)
        if "ray" in sys.modules:
            # Ray caches its config (auth mode included) when it loads.
            from ray._raylet import Config
            Config.initialize("")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_cluster(home: Path) -> dict[str, Any] | None:
    """The running local cluster's {address, pid}, or None (stale files are ignored)."""
    p = _state_path(home)
    try:
        st = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(st.get("pid", -1))):
        return None
    return st


def start_local(home: Path, num_cpus: int | None = None, npus: int = DEFAULT_NPUS,
                timeout: float = 120.0) -> dict[str, Any]:
    st = local_cluster(home)
    if st:
        return st
    home.mkdir(parents=True, exist_ok=True)
    _state_path(home).unlink(missing_ok=True)
    ncpu = num_cpus or max(4, os.cpu_count() or 1)
    logf = open(home / "local-cluster.log", "ab")  # noqa: SIM115 - handed to the daemon
    cmd = [sys.executable, "-m", "launcher.local", "serve", "--home", str(home),
           "--num-cpus", str(ncpu), "--npus", str(npus)]
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,  # noqa: S603
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, FLEET_HOME=str(home)))
    logf.close()
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = local_cluster(home)
        if st and st.get("ready"):
            return st
        if proc.poll() is not None:
            raise RuntimeError(f"local cluster exited with code {proc.returncode}; see "
                               f"{home / 'local-cluster.log'}")
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"local cluster did not start within {timeout:.0f}s; see "
                       f"{home / 'local-cluster.log'}")


def stop_local(home: Path, timeout: float = 60.0) -> bool:
    st = local_cluster(home)
    if not st:
        _state_path(home).unlink(missing_ok=True)
        return False
    pid = int(st["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _state_path(home).unlink(missing_ok=True)
    return True


class Unreachable(ConnectionError):
    """The address answers no Ray GCS within the bounds above."""


def gcs_host_port(addr: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for "auto" etc."""
    rest = addr.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe(addr: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise Unreachable unless something accepts a TCP connection at addr's port."""
    import socket

    hp = gcs_host_port(addr)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        why = f"no answer within {timeout:g}s" if isinstance(e, TimeoutError) else (
            e.strerror or str(e))
        raise Unreachable(f"nothing answers at {addr} ({why}); check "
                          "--address / RAY_ADDRESS (the Ray head's GCS host:port) or start "
                          "a local cluster with `fleet up`") from None


def init_bounded(timeout: float, **kw: Any) -> None:
    """ray.init in a helper thread, waited for at most `timeout` seconds.

    The main thread stays in Python while it waits, so Ctrl-C and SIGTERM reach the
    CLI's handlers instead of waiting on Ray's connection retries.
    """
    import ray

    err: list[BaseException] = []

    def run() -> None:
        try:
            ray.init(**kw)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            err.append(e)

    t = threading.Thread(target=run, daemon=True, name="fleet-ray-init")
    t.start()
    # Joined in slices: the kernel may hand Ctrl-C or SIGTERM to any of the process's
    # threads (Ray's own among them), and Python runs its handler only once the main thread
    # is back in the interpreter, which one long join would delay to the end of `timeout`.
    deadline = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < deadline:
        t.join(min(SIGNAL_POLL_S, max(0.0, deadline - time.monotonic())))
    if t.is_alive():
        raise Unreachable(f"no Ray cluster answered at {kw.get('address')} within "
                          f"{timeout:g}s ({CONNECT_TIMEOUT_ENV}); check --address / "
                          "RAY_ADDRESS points at a Ray head's GCS port (default 6379), not "
                          "another service")
    if err:
        raise err[0]


def connect(address: str | None, home: Path, start: bool):
    """ray.init to the right cluster; returns the controller actor handle."""
    quiet_ray()
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr:
        st = local_cluster(home)
        if st is None:
            if not start:
                raise NoCluster()
            st = start_local(home)
        addr = st["address"]
        use_local_token(home)
    import ray

    from launcher import controller as ctl

    if not ray.is_initialized():
        kw: dict[str, Any] = {}
        if addr.startswith("127.0.0.1:"):
            # Otherwise Ray swaps 127.0.0.1 for the host's primary IP, which the
            # loopback-bound head does not listen on.
            kw["_node_ip_address"] = "127.0.0.1"
        probe(addr)
        init_bounded(connect_timeout(), address=addr, namespace=ctl.NAMESPACE, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=True, **kw)
    return ctl.get_or_create(str(home))


class NoCluster(RuntimeError):
    pass


def serve(home: Path, num_cpus: int, npus: int) -> int:
    quiet_ray()
    use_local_token(home, create=True)
    import ray

    from launcher import controller as ctl

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(address="local", num_cpus=num_cpus, resources={"NPU": npus},
             include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace=ctl.NAMESPACE, logging_level=logging.WARNING)
    address = ray.get_runtime_context().gcs_address
    state = {"address": address, "pid": os.getpid(), "started": time.time(),
             "npus": npus, "num_cpus": num_cpus, "ready": False}
    tmp = _state_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state_path(home))
    c = ctl.get_or_create(str(home))
    ray.get(c.ping.remote(), timeout=120)
    state["ready"] = True
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state_path(home))
    print(f"local fleet cluster at {address} (pid {os.getpid()})", flush=True)
    while not stop.wait(1.0):
        pass
    # Stop the controller's ranks cleanly before the cluster goes away.
    with contextlib.suppress(Exception):
        for j in ray.get(c.list_jobs.remote(False), timeout=30):
            ray.get(c.cancel.remote(j["id"], "local cluster shut down"), timeout=60)
    with contextlib.suppress(Exception):
        ray.kill(c, no_restart=True)
    ray.shutdown()
    _state_path(home).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launcher.local")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--home", type=Path, default=fleet_home())
    s.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1))
    s.add_argument("--npus", type=int, default=DEFAULT_NPUS)
    a = ap.parse_args(argv)
    return serve(a.home, a.num_cpus, a.npus)


if __name__ == "__main__":
    sys.exit(main())
