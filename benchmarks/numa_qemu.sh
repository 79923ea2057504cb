#!/bin/sh
# pydedup on a real kernel of two NUMA nodes: boots a qemu guest (virtme-ng)
# with node 0 = CPU 0 + 2 GiB and node 1 = CPU 1 + 2 GiB, the host's
# filesystem shared read-only (9p, writes go to a throwaway overlay), and runs
# there: the topology, pydedup.features(), tests/test_numa.py,
# benchmarks/numa_guest_check.py and benchmarks/numa.py. Output on stdout.
#
#   sh benchmarks/numa_qemu.sh [--size 256M] [--rounds 5]    (from the repo root)
#
# Once, as root (Debian 12; checked with qemu 7.2, kernel 6.1.0-56, vng 1.42):
#   apt-get update
#   apt-get install -y --no-install-recommends qemu-system-x86 linux-image-amd64 \
#       busybox-static udev kmod numactl
#   pip install virtme-ng
#   python3 setup.py build_ext --inplace
#
# ACCEL=tcg (default) emulates the CPUs: about 20x slower, and every node is
# the same host memory, so latency and throughput per node mean nothing; it
# checks the kernel paths (move_pages, mbind, set_mempolicy, numa_maps).
# ACCEL=kvm needs working nested KVM: on a 6.18 host under KVM, qemu 7.2
# aborted on MSR 0x10a with -cpu host, and hung at boot without
# arch-capabilities, hence tcg.
set -e
cd "$(dirname "$0")/.."
KERNEL=${KERNEL:-$(ls /boot/vmlinuz-* | sort -V | tail -1)}
PY=$(python3 -c 'import sys; print(sys.executable)')    # not a pyenv shim: the guest's PATH is bare
SIZE=256M ROUNDS=5
while [ $# -gt 0 ]; do
    case $1 in --size) SIZE=$2; shift 2;; --rounds) ROUNDS=$2; shift 2;; *) echo "usage: $0 [--size S] [--rounds N]" >&2; exit 2;; esac
done
case ${ACCEL:-tcg} in
    tcg) ACCEL_OPTS=--disable-kvm;;
    kvm) ACCEL_OPTS="--qemu-opts=-cpu host,topoext=on,-arch-capabilities";;
esac
GUEST=$(mktemp /tmp/numa_qemu.XXXXXX.sh)
trap 'rm -f "$GUEST"' EXIT
cat > "$GUEST" <<EOF
exec 2>&1
cd $PWD
set -x
ls -d /sys/devices/system/node/node*
numactl -H || true
cat /proc/sys/kernel/numa_balancing
$PY -c 'import pydedup; print(pydedup.features())'
$PY -m pytest -q -p no:cacheprovider tests/test_numa.py || true
taskset -c 0 $PY -m pytest -q -p no:cacheprovider tests/test_numa.py -k kernel_merge_on_node_0 || true
$PY benchmarks/numa_guest_check.py --mib 64
$PY benchmarks/numa.py --size $SIZE --rounds $ROUNDS
EOF
vng $ACCEL_OPTS --run "$KERNEL" --cpus 2 --memory 4G \
    --numa 2G,cpus=0 --numa 2G,cpus=1 --exec "sh $GUEST"
