#!/usr/bin/env bash
# local-slurm.sh: a real, throwaway Slurm 22.05 cluster on localhost for distinfer's tests (Debian 12, root).
# munged + slurmctld + N slurmd daemons on ONE host (Debian builds Slurm with MULTIPLE_SLURMD),
# so `sbatch -N 2` gets two distinct Slurm nodes. No systemd, no cgroups; all state in one dir.
#   eval "$(bash local-cluster.sh up)"   # installs packages if missing, starts, waits for idle
#   bash local-cluster.sh status | env | down
# Settings (environment):
#   SLURM_LOCAL_DIR    state dir (default /tmp/slurm-local); holds config, logs, pid files
#   SLURM_LOCAL_NODES  number of slurmd nodes, named n1..nN (default 2)
#   SLURM_LOCAL_PORT   base TCP port (default 16817): ctld=P, dbd=P+1, mariadb=P+2, slurmd=P+10..
#   SLURM_LOCAL_ACCT   none (default: sacct only via `sacct -c`, job-level records from
#                      jobcomp/filetxt) | dbd (slurmdbd + private MariaDB: full sacct with steps)
#   SLURM_LOCAL_ETC_HOSTS=1  add "127.0.0.1 n1 .. nN" to /etc/hosts (removed on down), so node
#                      names from $SLURM_JOB_NODELIST resolve (e.g. for MASTER_ADDR)
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
N=${SLURM_LOCAL_NODES:-2}
P=${SLURM_LOCAL_PORT:-16817}
ACCT=${SLURM_LOCAL_ACCT:-none}
HOST=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)  # slurmctld checks its own name
NODES=$(seq -f 'n%g' 1 "$N" | paste -sd' ')
MARK="# slurm-local $DIR"
log() { echo "local-cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need() {  # install missing Debian packages without letting postinst start system services
  local miss=() p prc=/usr/sbin/policy-rc.d own=0
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || miss+=("$p"); done
  [ ${#miss[@]} -eq 0 ] && return 0
  log "installing ${miss[*]}"
  [ -e $prc ] || { printf '#!/bin/sh\nexit 101\n' >$prc; chmod +x $prc; own=1; }
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${miss[@]}" >&2
  [ $own = 0 ] || rm -f $prc
}
running() {  # pid comm: that process exists with that name and is no zombie (PID reuse-safe)
  [ "$(cat /proc/"$1"/comm 2>/dev/null)" = "$2" ] && ! grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null
}
stopped() { ! running "$@"; }
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && running "$pid" "$2"; }  # pidfile comm
wait_for() {  # seconds command...: poll until command succeeds
  local t=$(( $1 * 5 )); shift
  until "$@" >/dev/null 2>&1; do t=$((t - 1)); [ $t -gt 0 ] || return 1; sleep 0.2; done
}

all_idle() { [ "$(sinfo -h -N -o %T | sort -u)" = idle ] && [ "$(sinfo -h -N | wc -l)" -eq "$N" ]; }
no_jobs() { [ -z "$(squeue -h)" ]; }
print_env() { echo "export SLURM_CONF=$DIR/slurm.conf"; }

up() {
  [ "$(id -u)" = 0 ] || die "run as root (daemons run with SlurmUser=root)"
  export SLURM_CONF=$DIR/slurm.conf
  if alive "$DIR/run/slurmctld.pid" slurmctld; then log "already up"; print_env; return; fi
  down 2>/dev/null  # stop leftovers of a half-started cluster
  need slurmctld slurmd slurm-client munge
  [ "$ACCT" = dbd ] && need slurmdbd mariadb-server
  rm -rf "$DIR"/{state,spool,log,run,db}
  mkdir -p "$DIR"/{state,log,run,munge} && chmod 755 "$DIR" "$DIR/munge"  # munged wants o+x
  for n in $NODES; do mkdir -p "$DIR/spool/$n"; done
  [ -s "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom >"$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
  local sock=$DIR/munge/munge.sock mem
  mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) * 9 / 10240 / N ))  # MB, 90% split over nodes
  cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
SlurmctldPort=$P
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
NodeName=n[1-$N] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$((P + 10))-$((P + 9 + N))] CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  munged --key-file="$DIR/munge/munge.key" --socket="$sock" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  if [ "$ACCT" = dbd ]; then
    cat >>"$SLURM_CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((P + 1))
AccountingStoragePass=$sock
EOF
    # ^ AccountingStoragePass = the munge socket used towards slurmdbd (AuthInfo is not used there)
    mariadb-install-db --user=root --datadir="$DIR/db/data" --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$DIR/db/mysqld.sock" \
      --pid-file="$DIR/run/mariadbd.pid" --port=$((P + 2)) --bind-address=127.0.0.1 \
      --innodb-buffer-pool-size=64M --log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for 30 mariadb -S "$DIR/db/mysqld.sock" -u root -e 'select 1' || die "mariadb did not start"
    mariadb -S "$DIR/db/mysqld.sock" -u root -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    (umask 077; cat >"$DIR/slurmdbd.conf") <<EOF
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$((P + 1))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((P + 2))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    slurmdbd  # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 30 grep -q 'slurmdbd version .* started' "$DIR/log/slurmdbd.log" || die "slurmdbd: see $DIR/log"
  fi
  slurmctld
  for n in $NODES; do slurmd -N "$n"; done
  wait_for 60 all_idle || { sinfo -N >&2 || true; die "nodes not idle; see $DIR/log"; }
  if [ "${SLURM_LOCAL_ETC_HOSTS:-0}" = 1 ] && ! grep -qF "$MARK" /etc/hosts; then
    echo "127.0.0.1 $NODES $MARK" >>/etc/hosts
  fi
  log "up: $N node(s) idle"; print_env
}

down() {
  export SLURM_CONF=$DIR/slurm.conf
  if alive "$DIR/run/slurmctld.pid" slurmctld; then  # cancel jobs so no slurmstepd outlives slurmd
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
    wait_for 30 no_jobs || log "jobs still listed"
  fi
  local pids=() f c pid
  for f in "$DIR"/run/*.pid; do
    [ -e "$f" ] || continue
    c=$(basename "$f" .pid); c=${c%%-*}  # slurmd-n1 -> slurmd
    if alive "$f" "$c"; then pid=$(cat "$f"); kill "$pid"; pids+=("$pid:$c"); fi
  done
  for f in "${pids[@]}"; do  # wait up to 30 s each, then SIGKILL
    pid=${f%%:*}; c=${f#*:}
    wait_for 30 stopped "$pid" "$c" || { log "SIGKILL $c $pid"; kill -9 "$pid" 2>/dev/null || true; }
  done
  if grep -qF "$MARK" /etc/hosts 2>/dev/null; then  # rewrite in place (may be a bind mount)
    local h; h=$(grep -vF "$MARK" /etc/hosts); printf '%s\n' "$h" >/etc/hosts
  fi
  log "down (${#pids[@]} daemon(s) stopped)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) print_env ;;
  status) export SLURM_CONF=$DIR/slurm.conf; sinfo -N; squeue ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
