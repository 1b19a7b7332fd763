#!/usr/bin/env python
"""A real single-node Slurm cluster on localhost, for testing slurm/llama3_8b_milora.sh.

Uses Debian's packages (slurmctld, slurmd, slurm-client, munge; installed with apt-get when
missing and we are root). Everything the daemons write (munge key and socket, slurm.conf,
state, spool, logs, pid files) lives in one scratch folder and the clients find the config
through SLURM_CONF, so nothing under /etc is touched. The daemons are stopped by their pid
files when the context exits.

    python tests/slurm_cluster.py --work /tmp/slurm   # start, print the env to use, wait for Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def install() -> None:
    """apt-get install the daemons (root only); raise with what is missing otherwise."""
    if not missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"Slurm is not installed ({missing_binaries()} missing) and cannot be installed "
                           f"here (needs root and apt-get): apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, text=True)
    if run.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        run = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    if missing_binaries():
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} left {missing_binaries()} missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """slurmctld + slurmd + munged on this host, configured in ``work``."""

    DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order, by their pid files

    def __init__(self, work: str):
        self.work = os.path.abspath(work)
        self.host = socket.gethostname().split(".")[0]
        # the machine's real CPU count: a job must ask for what a small node has (the
        # documented CPU submission passes --cpus-per-task)
        self.cpus = os.cpu_count() or 1
        self.conf = os.path.join(self.work, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.pidfiles = {n: os.path.join(self.work, f"{n}.pid") for n in ("munged", "slurmctld", "slurmd")}

    # ---- setup ----------------------------------------------------------------------------
    def _write_config(self) -> None:
        w = self.work
        for d in ("state", "spool", "munge"):
            os.makedirs(os.path.join(w, d), exist_ok=True)
        os.chmod(os.path.join(w, "munge"), 0o700)
        key = os.path.join(w, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        empty = os.path.join(w, "plugstack.conf")
        open(empty, "w").close()
        lines = [
            "ClusterName=milora-local", f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={w}/munge/munge.socket",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={w}/state", f"SlurmdSpoolDir={w}/spool",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}", f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={w}/slurmctld.log", f"SlurmdLogFile={w}/slurmd.log",
            f"PlugStackConfig={empty}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "KillWait=10",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN",
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        install()
        os.makedirs(self.work, exist_ok=True)
        self._write_config()
        m = os.path.join(self.work, "munge")
        subprocess.run([_sbin("munged"), "--force", f"--key-file={m}/munge.key", f"--socket={m}/munge.socket",
                        f"--pid-file={self.pidfiles['munged']}", f"--log-file={m}/munged.log",
                        f"--seed-file={m}/munge.seed"], check=True, env=self.env)
        subprocess.run([_sbin("slurmctld"), "-f", self.conf], check=True, env=self.env)
        subprocess.run([_sbin("slurmd"), "-f", self.conf], check=True, env=self.env)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
            state = out.stdout.strip()
            if state.startswith("idle"):
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the local Slurm node did not become idle within {timeout:.0f} s (state {state!r}); "
                           f"logs in {self.work}")

    def stop(self) -> None:
        """Stop the daemons this object started (by their pid files); wait for them to exit."""
        for name in self.DAEMONS:
            try:
                pid = int(open(self.pidfiles[name]).read().strip())
            except (OSError, ValueError, KeyError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- jobs -----------------------------------------------------------------------------
    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """scontrol's view of the job as key -> value (empty once the job is purged)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)])
        fields = {}
        for token in out.stdout.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job_id: int, timeout: float, until=None) -> dict:
        """Poll until the job ends (or ``until(job)`` is true); raise on timeout."""
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if until is not None and until(info):
                return info
            if until is None and info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder for config, state, logs and the munge key")
    args = p.parse_args()
    with LocalSlurm(args.work) as cluster:
        print(f"Slurm is up. In another shell: export SLURM_CONF={cluster.conf}\nCtrl-C stops the daemons.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
