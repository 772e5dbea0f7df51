#!/bin/sh
# PID 1 of a qemu VM's initramfs (busybox sh): load the virtio drivers, bring up the network, mount the
# VM's image (the read-only disk /dev/vda) under a tmpfs overlay, switch_root into it and run the agent
# there, on the image's own Python.
#
# Why a tmpfs overlay rather than a writable disk: every write of the VM stays in its memory, so a
# memory snapshot (or boot template) is the whole VM, and the image's disk is shared by every VM of the
# image unchanged.
#
# The network needs no per-VM settings, so a VM restored from a snapshot into another slot works as it
# is: the whole guest half of the VM CIDR (gw.anyip=) is a local route ("AnyIP"), so the guest answers
# on whichever address its slot has, and replies go straight out of eth0 to the host side, which lies
# in the other half of the CIDR. (Network settings are the kernel's: they outlive switch_root.)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
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

fail() {
    echo "gateway-init: $*" >/dev/console
    poweroff -f
}
# The image read-only, the VM's writes in memory. The lower and tmpfs mounts stay behind in the
# initramfs's tree, out of the VM's sight after switch_root (the overlay keeps them alive).
mkdir -p /image /rw
mount -t ext4 -o ro,noatime /dev/vda /image || fail "cannot mount the image disk"
mount -t tmpfs -o mode=0755 rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/image,upperdir=/rw/upper,workdir=/rw/work root /newroot ||
    fail "cannot mount the overlay"
[ -x /newroot/usr/bin/python3 ] || fail "the image has no /usr/bin/python3 (the agent needs it)"
mkdir -p /newroot/usr/lib/gateway /newroot/home/vm /newroot/proc /newroot/sys /newroot/dev /newroot/tmp \
    /newroot/run
cp /usr/lib/gateway/agent.py /newroot/usr/lib/gateway/agent.py
for fs in proc sys dev; do
    mount -o move "/$fs" "/newroot/$fs"
done
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs -o mode=755 run /newroot/run
hostname "$(cat /newroot/etc/hostname 2>/dev/null || echo sandbox)"
echo "gateway-init: network up, image mounted" >/dev/console
# The agent is the VM's life: if it ever exits, start it again (commands it ran keep running). The
# image's /bin/sh (dash: Essential in every Debian root) is PID 1 from here on.
exec switch_root /newroot /bin/sh -c '
while true; do
    python3 -I /usr/lib/gateway/agent.py </dev/null >/dev/console 2>&1
    sleep 1
done'
