#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for the tests of slurm/ (needs root and Debian's
# slurmctld slurmd slurm-client munge).  It stops only what it started, by its own pid files.
#   slurm/localcluster.sh start DIR   -> prints "export SLURM_CONF=DIR/slurm.conf"
#   slurm/localcluster.sh stop DIR
set -euo pipefail
action=${1:?usage: localcluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: localcluster.sh start|stop DIR}")

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "unknown action $action" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 3; }
for tool in slurmctld slurmd sinfo munged; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
done
mkdir -p "$dir"/{state,spool,log}
node=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *$//')
cat > "$dir/slurm.conf" <<CONF
ClusterName=alphanet-test
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$dir/cgroup.conf" <<CONF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
CONF
export SLURM_CONF="$dir/slurm.conf"
if ! pgrep -x munged >/dev/null; then
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- munged --pid-file="$dir/munged.pid" 2>/dev/null || runuser -u munge -- munged
  [ -f "$dir/munged.pid" ] || pgrep -n -x munged > "$dir/munged.pid"
fi
setsid slurmctld -D -c -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 < /dev/null &
setsid slurmd -D -N localhost -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 < /dev/null &
for _ in $(seq 100); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "the local cluster did not become idle; logs in $dir/log" >&2
stop
exit 1
