#!/bin/sh
# PID 1 of a qemu VM (busybox sh): mount, load the virtio drivers, bring up the network, run the agent.
#
# The network needs no per-VM settings, so a VM restored from a snapshot into another slot works as it
# is: the whole guest half of the VM CIDR (gw.anyip=) is a local route ("AnyIP"), so the guest answers
# on whichever address its slot has, and replies go straight out of eth0 to the host side, which lies
# in the other half of the CIDR.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs -o mode=755 run /run
for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module.ko" || echo "gateway-init: cannot load $module" >/dev/console
done
anyip=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^gw\.anyip=//p')
if [ -n "$(tr ' ' '\n' </proc/cmdline | grep -x gw.probe)" ]; then
    echo "gateway-probe: booted" >/dev/console
    poweroff -f
fi
ip link set lo up
ip link set eth0 up
ip route add local "$anyip" dev lo table local
ip route add default dev eth0
mkdir -p /home/vm
hostname vm
echo "gateway-init: network up" >/dev/console
# The agent is the VM's life: if it ever exits, start it again (commands it ran keep running).
while true; do
    python3 -I /usr/lib/gateway/agent.py </dev/null >/dev/console 2>&1
    sleep 1
done
