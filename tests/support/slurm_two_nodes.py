#!/usr/bin/env python
"""A real two-node Slurm cluster on one machine: each node a network namespace with its own
hostname and address, joined by a bridge; slurmctld and munged on the host. For testing
slurm/llama3_8b_milora.sh across hosts (torchrun's c10d rendezvous and gloo cross the bridge).

    bridge milora-br0 10.77.0.1/24 (the controller) <-veth-> node1 10.77.0.11, node2 10.77.0.12

Each slurmd runs as ``nsenter --net=<ns> unshare --uts`` with the node's hostname (``ip netns
exec`` remounts /sys and slurmd then finds no cgroup filesystem). The node names are added
to /etc/hosts while the cluster runs (restored after). Traffic stays among these addresses.

    python tests/support/slurm_two_nodes.py --work /tmp/slurm2   # start, wait for Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

from slurm_cluster import LocalSlurm, _free_port, _sbin, install

BRIDGE = "milora-br0"
SUBNET = "10.77.0"
NODES = ("node1", "node2")
HOSTS_MARK = "# milora-megatron two-node test"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host the namespaced nodes, or None."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = "milora-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    veth = subprocess.run(["ip", "link", "add", "milora-pv0", "type", "veth", "peer", "name", "milora-pv1"],
                          capture_output=True, text=True)
    if veth.returncode != 0:
        return f"`ip link add ... type veth` failed: {veth.stderr.strip()}"
    subprocess.run(["ip", "link", "del", "milora-pv0"], capture_output=True)
    return None


class TwoNodeSlurm(LocalSlurm):
    """slurmctld + munged on the host, one slurmd per namespaced node."""

    DAEMONS = ("slurmd", *NODES, "slurmctld", "munged")

    def __init__(self, work: str, cpus_per_node: int | None = None):
        super().__init__(work)
        self.cpus = cpus_per_node or self.cpus
        self.pidfiles.update({n: os.path.join(self.work, f"slurmd-{n}.pid") for n in NODES})
        self.addresses = {n: f"{SUBNET}.1{i + 1}" for i, n in enumerate(NODES)}

    # ---- network ----------------------------------------------------------------------------
    def _network_up(self) -> None:
        self._network_down()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, node in enumerate(NODES):
            host_end = f"milora-v{i + 1}"
            _ip("netns", "add", node)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", node)
            _ip("link", "set", host_end, "master", BRIDGE)
            _ip("link", "set", host_end, "up")
            _ip("-n", node, "addr", "add", f"{self.addresses[node]}/24", "dev", "eth0")
            _ip("-n", node, "link", "set", "eth0", "up")
            _ip("-n", node, "link", "set", "lo", "up")
        with open("/etc/hosts") as f:
            hosts = f.read()
        with open("/etc/hosts", "w") as f:
            f.write(hosts + "".join(f"{a} {n} {HOSTS_MARK}\n" for n, a in self.addresses.items()))

    def _network_down(self) -> None:
        for node in NODES:
            _ip("netns", "del", node, check=False)
        _ip("link", "del", BRIDGE, check=False)
        try:
            with open("/etc/hosts") as f:
                lines = [line for line in f if HOSTS_MARK not in line]
            with open("/etc/hosts", "w") as f:
                f.writelines(lines)
        except OSError:
            pass

    # ---- daemons ----------------------------------------------------------------------------
    def _write_config(self) -> None:
        super()._write_config()
        w = self.work
        with open(self.conf) as f:
            lines = [line.rstrip("\n") for line in f]
        keep = [line for line in lines if not line.startswith(("SlurmctldHost=", "NodeName=", "SlurmdSpoolDir=",
                                                                 "SlurmdPidFile=", "SlurmdLogFile="))]
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.4)
        keep += [f"SlurmctldHost={self.host}({SUBNET}.1)", f"SlurmdSpoolDir={w}/spool-%n",
                 f"SlurmdPidFile={w}/slurmd-%n.pid", f"SlurmdLogFile={w}/slurmd-%n.log"]
        keep += [f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN"
                 for n, a in self.addresses.items()]
        with open(self.conf, "w") as f:
            f.write("\n".join(keep) + "\n")

    def start(self, timeout: float = 90.0) -> "TwoNodeSlurm":
        install()
        why = namespaces_unavailable()
        if why:
            raise RuntimeError(why)
        os.makedirs(self.work, exist_ok=True)
        self._write_config()
        self._network_up()
        m = os.path.join(self.work, "munge")
        subprocess.run([_sbin("munged"), "--force", f"--key-file={m}/munge.key", f"--socket={m}/munge.socket",
                        f"--pid-file={self.pidfiles['munged']}", f"--log-file={m}/munged.log",
                        f"--seed-file={m}/munge.seed"], check=True, env=self.env)
        subprocess.run([_sbin("slurmctld"), "-f", self.conf], check=True, env=self.env)
        for node in NODES:
            subprocess.run(["nsenter", f"--net=/var/run/netns/{node}", "unshare", "--uts", "sh", "-c",
                            f"hostname {node} && exec {_sbin('slurmd')} -f {self.conf}"], check=True, env=self.env)
        deadline, states = time.time() + timeout, ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=self.env)
            states = out.stdout.strip()
            if states and all(line.split()[1].startswith("idle") for line in states.splitlines()) \
                    and len(states.splitlines()) == len(NODES):
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the two Slurm nodes did not become idle within {timeout:.0f} s ({states!r}); "
                           f"logs in {self.work}")

    def stop(self) -> None:
        super().stop()
        self._network_down()

    # ---- faults -----------------------------------------------------------------------------
    def pids_on(self, node: str, pattern: str) -> list[int]:
        """Processes in ``node``'s namespace whose command line contains ``pattern``."""
        out = _ip("netns", "pids", node, check=False).stdout.split()
        found = []
        for pid in map(int, out):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if pattern in cmdline:
                found.append(pid)
        return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder for config, state, logs and the munge key")
    args = p.parse_args()
    with TwoNodeSlurm(args.work) as cluster:
        print(f"Slurm is up (nodes {', '.join(NODES)}). In another shell: export SLURM_CONF={cluster.conf}\n"
              "Ctrl-C stops the daemons and removes the namespaces.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
