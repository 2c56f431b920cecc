#!/bin/sh
# /init of the kata-py mini initrd (busybox-static). Loads the kernel modules, mounts the read-only
# erofs root (/dev/vda) under a tmpfs overlay and switch_roots into the Python agent, which is PID 1.
# Markers on the console (ttyS0) let tests and benchmarks time the boot.
export PATH=/bin
fail() {
	echo "KATA_PY_INIT_FAILED: $*"
	exit 1 # PID 1 exiting panics the kernel; with panic=-1 QEMU (-no-reboot) stops.
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read -r up _ </proc/uptime
echo "KATA_PY_INITRD uptime=$up"

# Dependency order was computed at build time (modprobe --show-depends); no udev, no modprobe here.
while read -r m; do
	insmod "/lib/modules/$m" 2>/dev/null
done </etc/modules.load
read -r up _ </proc/uptime
echo "KATA_PY_MODULES_LOADED uptime=$up"

# virtio-blk probes asynchronously after insmod: wait up to 5 s for the disk.
i=0
while [ ! -b /dev/vda ]; do
	[ $i -ge 500 ] && fail "no /dev/vda"
	sleep 0.01
	i=$((i + 1))
done
mount -t erofs -o ro /dev/vda /lower || fail "mount erofs /dev/vda"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
	fail "mount overlay"
for d in proc sys dev; do
	mount --move "/$d" "/newroot/$d" || fail "move /$d"
done

read -r up _ </newroot/proc/uptime
echo "KATA_PY_SWITCH_ROOT uptime=$up"
cd /
export PYTHONPATH=/opt/kata-py
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec switch_root /newroot /usr/bin/python3 -m agent
