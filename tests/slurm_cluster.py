"""A private one-node Slurm cluster on this host, for tests: munged, slurmctld and slurmd started directly.

Everything lives in a fresh folder (configuration, state, spool, logs, a munge key and socket) and the
daemons listen on free ports, so a Slurm or munge already installed and running here is neither used nor
disturbed. Debian's slurm-wlm and munge packages are all it needs, and root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
SEARCH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin, off some users' PATH

CONF = """\
ClusterName=dihtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to `scontrol show job` for 10 minutes: the tests read their start and end times
MinJobAge=600
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def unavailable() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    absent = [name for name in COMMANDS if shutil.which(name, path=SEARCH) is None]
    if absent:
        return f"no Slurm here (missing {', '.join(absent)}): apt-get install slurm-wlm munge, as .ci/run does"
    if os.geteuid() != 0:
        return "starting a private Slurm cluster (munged, slurmctld, slurmd) needs root"
    return None


@contextlib.contextmanager
def one_node_cluster() -> Iterator[Path]:
    """Start the cluster and yield its slurm.conf (clients find it through SLURM_CONF); stop it all afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="dih-slurm-"))
    folder.chmod(0o755)  # munged wants its socket's folder open to all, which pytest's temp folders are not
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    # This host as slurmd sees it, `NodeName=<hostname -s> CPUs=... RealMemory=...`: a node that claimed more
    # CPUs or memory than it has would be drained.
    node = subprocess.run([shutil.which("slurmd", path=SEARCH), "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    host = node.split()[0].removeprefix("NodeName=")
    conf = folder / "slurm.conf"
    conf.write_text(CONF.format(host=host, node=node, folder=folder, ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(folder / f"{name}.out", "w") as out:
            daemons.append(subprocess.Popen([shutil.which(name, path=SEARCH), *args], stdout=out,
                                            stderr=subprocess.STDOUT, env=env))

    try:
        start("munged", "--foreground", f"--socket={folder}/munge.socket", f"--key-file={key}",
              f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed")
        wait_until(lambda: (folder / "munge.socket").exists(), "munged to open its socket", folder)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf))
        wait_until(lambda: command("sinfo", "--noheader", "--Node", "--format=%T", env=env).strip() == "idle",
                   "the node to be idle", folder)
        yield conf
    finally:
        if daemons[1:]:  # jobs outlive slurmd (slurmstepd runs them): cancel them and let them go first
            subprocess.run(["scancel", "--me"], env=env, capture_output=True)
            with contextlib.suppress(RuntimeError):
                wait_until(lambda: not command("squeue", "--noheader", env=env).strip(), "the jobs to end", folder, 20)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)


def command(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """A Slurm command's output, or '' where it fails (a daemon not answering yet)."""
    result = subprocess.run([shutil.which(name, path=SEARCH), *args], env=env, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], what: str, folder: Path, timeout: float = 60) -> None:
    """Poll `ready`; past the timeout, fail with the end of every daemon's log, where the reason is."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                           for log in sorted(folder.glob("*.log")) + sorted(folder.glob("*.out")))
            raise RuntimeError(f"Slurm: waited {timeout:.0f} s for {what}{logs}")
        time.sleep(0.2)
