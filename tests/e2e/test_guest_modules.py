"""Kernel modules on demand in the guest (issue #16): a privileged container (or one with
CAP_NET_ADMIN) makes bridges, veths, vxlans, tun/tap, iptables rules, tc qdiscs and loop mounts, and
the guest kernel loads each module the first time (request_module → the guest's /sbin/modprobe,
packaging/guest/guest_kernel.py ON_DEMAND_MODULES); a container without the capabilities loads none.

The busybox test image has no iproute2 or iptables: the container runs the host's (Debian bookworm,
the guest's userland too) from a read-only bind of the host's /usr, through its dynamic loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.containerd import RUNTIME, RUNTIME_HANDLER, PrivateContainerd
from tests.support.cri import CriClient, container_config, pod_config
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [
    pytest.mark.containerd,
    pytest.mark.vm,
    pytest.mark.skipif(
        any(not Path(p).exists() for p in ("/usr/bin/ip", "/usr/sbin/tc", "/usr/sbin/xtables-nft-multi",
                                           "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                                           "/usr/lib/x86_64-linux-gnu/xtables")),
        reason="needs the host's iproute2 and iptables (Debian bookworm paths)"),
]

HOST_USR = ["--mount", "type=bind,src=/usr,dst=/h/usr,options=rbind:ro"]

# Shell prelude: the host's tools through the host's loader, busybox applets the image does not link;
# `try NAME 'CMD'` runs CMD (in this shell: it sees the functions) and prints `OK NAME` or `FAIL NAME: why`.
PRELUDE = r"""
L="/h/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /h/usr/lib/x86_64-linux-gnu"
export XTABLES_LIBDIR=/h/usr/lib/x86_64-linux-gnu/xtables
ip() { $L /h/usr/bin/ip "$@"; }
tc() { $L /h/usr/sbin/tc "$@"; }
ipt() { $L /h/usr/sbin/xtables-nft-multi iptables "$@"; }
ip6t() { $L /h/usr/sbin/xtables-nft-multi ip6tables "$@"; }
iptl() { $L /h/usr/sbin/xtables-legacy-multi iptables "$@"; }
for a in mknod mount umount touch brctl losetup mke2fs; do eval "$a() { busybox $a \"\$@\"; }"; done
node() { [ -e "$1" ] || { mkdir -p "${1%/*}" && mknod "$1" "$2" "$3" "$4"; }; }
try() { if out=$(eval "$2" 2>&1); then echo "OK $1"; else echo "FAIL $1: $out" | tr '\n' ' '; echo; fi; }
"""

# What a privileged container does, and the module each step must have loaded: links, iptables, tc ...
NET_STEPS = r"""
try iproute2 'ip -V | grep -q iproute2'
try brctl 'brctl addbr foobar'
try bridge 'ip link add kpbr0 type bridge'
try veth 'ip link add v0 type veth peer name v1'
try vxlan 'ip link add vx0 type vxlan id 42 dstport 4789 dev lo'
try dummy 'ip link add kpd0 type dummy'
try macvlan 'ip link add kpmv0 link kpd0 type macvlan mode bridge'
try ipvlan 'ip link add kpd1 type dummy && ip link add kpiv0 link kpd1 type ipvlan mode l2'
try vlan 'ip link add link kpd0 name kpd0.7 type vlan id 7'
try up 'ip link set kpd0 up && ip link set kpmv0 up'
try nat_masquerade 'ipt -t nat -A POSTROUTING -o kpd0 -j MASQUERADE'
try nat_redirect 'ipt -t nat -A PREROUTING -p tcp --dport 8081 -j REDIRECT --to-ports 80'
try conntrack 'ipt -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT'
try ip6_filter 'ip6t -A INPUT -p tcp --dport 22 -j REJECT'
try nat_listed 'ipt -t nat -S | grep -q -- "--to-ports 80"'
try htb 'tc qdisc add dev kpd0 root handle 1: htb default 10'
try netem 'tc qdisc add dev kpmv0 root netem delay 1ms'
try ingress_u32 'tc qdisc add dev kpd0 ingress && tc filter add dev kpd0 parent ffff: protocol ip u32 match u32 0 0 action drop'
try overlay 'mkdir -p /mnt && mount -t tmpfs tmpfs /mnt && mkdir /mnt/l /mnt/u /mnt/w /mnt/o && mount -t overlay overlay -o lowerdir=/mnt/l,upperdir=/mnt/u,workdir=/mnt/w /mnt/o && touch /mnt/o/f && umount /mnt/o'
"""
# ... and devices (nodes made here when ctr did not copy the host's: same numbers), on NET_STEPS' /mnt tmpfs
DEVICE_STEPS = r"""
try tuntap 'node /dev/net/tun c 10 200 && ip tuntap add dev kptap0 mode tap'
try fuse 'node /dev/fuse c 10 229 && exec 3<>/dev/fuse'
dd if=/dev/zero of=/mnt/img bs=1M count=8 2>/dev/null
node /dev/loop-control c 10 237
try loop 'd=$(losetup -f) && n=${d#/dev/loop} && node $d b 7 $n && losetup $d /mnt/img && echo $d >/mnt/dev'
D=$(cat /mnt/dev 2>/dev/null)
try ext4 'mke2fs -q $D && mkdir /mnt/e && mount -t ext4 $D /mnt/e && echo hi >/mnt/e/x && umount /mnt/e'
# not file systems of this image, but mounting asks the kernel for them (fs-xfs, fs-squashfs)
mount -t xfs $D /mnt/e 2>/dev/null; mount -t squashfs $D /mnt/e 2>/dev/null
[ -n "$D" ] && losetup -d $D
"""
LIST_MODULES = "echo MODULES; cat /proc/modules\n"
NET_MODULES = {
    "brctl": {"bridge"}, "veth": {"veth"}, "vxlan": {"vxlan"}, "dummy": {"dummy"}, "macvlan": {"macvlan"},
    "ipvlan": {"ipvlan"}, "vlan": {"8021q"},
    "nat_masquerade": {"nf_tables", "nft_compat", "nft_chain_nat", "nf_nat", "nf_conntrack", "xt_MASQUERADE"},
    "nat_redirect": {"xt_REDIRECT"}, "conntrack": {"xt_conntrack"}, "ip6_filter": {"ip6t_REJECT"},
    "htb": {"sch_htb"}, "netem": {"sch_netem"}, "ingress_u32": {"sch_ingress", "cls_u32", "act_gact"},
}
NET_ONLY_STEPS = {"iproute2", "bridge", "up", "nat_listed", "overlay"}  # checked by their own success
# what agent/sandbox.py's legacy netfilter tables pull in, that a step of ours also needs
LEGACY_TABLE_DEPS = {"nf_nat", "nf_conntrack", "nf_defrag_ipv4", "nf_defrag_ipv6", "x_tables", "libcrc32c"}
DEVICE_MODULES = {"tuntap": {"tun"}, "loop": {"loop"}, "ext4": {"ext4"}}
MOUNT_ONLY = {"xfs", "squashfs"}  # asked for by a mount that then fails: loaded all the same


def parse(out: str) -> tuple[dict[str, str], set[str]]:
    """The script's `OK name` / `FAIL name: why` lines, and the names in /proc/modules after them."""
    steps: dict[str, str] = {}
    head, _, modules = out.partition("MODULES\n")
    for line in head.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("OK", "FAIL"):
            name, _, why = rest.partition(": ")
            steps[name] = "" if word == "OK" else why or "failed"
    return steps, {line.split()[0] for line in modules.splitlines() if line.strip()}


@pytest.fixture
def busybox(containerd: PrivateContainerd) -> str:
    return containerd.import_busybox()


def _run(ctd: PrivateContainerd, image: str, name: str, script: str, *flags: str) -> str:
    res = ctd.ctr("run", "--rm", "--runtime", RUNTIME, *flags, *HOST_USR, image, name, "sh", "-c", script,
                  timeout=300, check=False)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, (out, res.stderr.decode(errors="replace"), ctd.log_tail())
    return out


def _check(out: str, expected: dict[str, set[str]], others: set[str]) -> set[str]:
    """Every step succeeded and loaded its modules; returns what /proc/modules lists."""
    steps, loaded = parse(out)
    failed = {n: why for n, why in steps.items() if why}
    assert not failed, out
    assert set(steps) >= set(expected) | others, out
    missing = {n: mods - loaded for n, mods in expected.items() if mods - loaded}
    assert not missing, f"not loaded: {missing}\n/proc/modules: {sorted(loaded)}"
    return loaded


def test_privileged_container_loads_modules_on_demand(containerd: PrivateContainerd, busybox: str) -> None:
    script = "echo BEFORE; cat /proc/modules; echo END;" + PRELUDE + NET_STEPS + DEVICE_STEPS + LIST_MODULES
    out = _run(containerd, busybox, "mods-priv", script, "--privileged")
    before = {line.split()[0] for line in out.partition("BEFORE\n")[2].partition("END\n")[0].splitlines()}
    expected = NET_MODULES | DEVICE_MODULES
    # the legacy xtables tables were there before the workload ran (the agent loads them for a
    # container with CAP_NET_ADMIN), with what they depend on and nothing else...
    assert {"iptable_nat", "iptable_filter", "ip6table_nat", "ebtable_filter"} <= before, sorted(before)
    # ...and none of the others was loaded at boot: the step loaded it
    assert not before & set().union(*expected.values(), MOUNT_ONLY) - LEGACY_TABLE_DEPS, sorted(before)
    assert "virtio_blk" in before  # the initrd's
    loaded = _check(out, expected, NET_ONLY_STEPS | {"fuse"})
    assert MOUNT_ONLY <= loaded, sorted(loaded)
    wait_for(lambda: not qemu_pids(containerd), timeout=30, what="QEMU gone")


# CAP_NET_ADMIN alone: links and their modules (rtnetlink asks for rtnl-link-<kind> with no further
# check); without it rtnetlink and nfnetlink refuse before the kernel asks for a module. The bridge
# ioctl is the exception: the kernel asks for `bridge` before the bridge code checks CAP_NET_ADMIN
# (as on any host), so a plain container loads it but still cannot make a bridge (docs/security.md).
NET_ADMIN = PRELUDE + r"""
try dummy 'ip link add kpd0 type dummy'
try vxlan 'ip link add vx0 type vxlan id 42 dstport 4789 dev lo'
try nat 'ipt -t nat -A POSTROUTING -j MASQUERADE'
try brctl 'brctl addbr foobar'
try legacy 'iptl -t nat -A POSTROUTING -j MASQUERADE'
echo MODULES; cat /proc/modules
"""


def test_added_capability_is_enough_and_none_loads_nothing(containerd: PrivateContainerd, busybox: str) -> None:
    out = _run(containerd, busybox, "mods-netadmin", NET_ADMIN, "--cap-add", "CAP_NET_ADMIN")
    steps, loaded = parse(out)
    assert not any(steps.values()) and len(steps) == 5, out
    # legacy xtables: the kernel never asks for its tables; the agent loaded them for CAP_NET_ADMIN
    assert {"dummy", "vxlan", "nf_tables", "nft_chain_nat", "bridge", "iptable_nat", "ip_tables"} <= loaded, sorted(loaded)

    out = _run(containerd, busybox, "mods-plain", NET_ADMIN)
    steps, loaded = parse(out)
    assert len(steps) == 5 and all(steps.values()), out  # every step refused
    assert "iptable_nat" not in loaded, sorted(loaded)  # no CAP_NET_ADMIN: the agent loaded nothing
    assert "not permitted" in steps["dummy"] and "not permitted" in steps["brctl"], steps
    assert not {"dummy", "vxlan", "nf_tables", "nft_chain_nat", "nft_compat"} & loaded, sorted(loaded)
    assert "bridge" in loaded  # the ioctl's request comes first (see NET_ADMIN)
    wait_for(lambda: not qemu_pids(containerd), timeout=30, what="QEMU gone")


# packaging/containerd's privileged_without_host_devices = true (as Kata's): a CRI privileged container
# has every capability but no device nodes and a device cgroup that refuses them, so only the
# network steps (what critest's "Privileged is true; adding capability" spec does: brctl addbr).
def test_cri_privileged_container_loads_modules(cri_env: tuple[PrivateContainerd, CriClient, str]) -> None:
    ctd, client, busybox = cri_env
    pod = pod_config("mods")
    pod.linux.security_context.privileged = True  # CRI refuses a privileged container in a pod that is not
    pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
    try:
        config = container_config("priv", busybox, ["sleep", "600"], mounts={"/h/usr": "/usr"})
        config.mounts[0].readonly = True
        config.linux.security_context.privileged = True
        cid = client.create_container(pod_id, config, pod)
        client.start_container(cid)
        res = client.exec_sync(cid, ["sh", "-c", PRELUDE + NET_STEPS + LIST_MODULES], timeout_s=240)
        assert res.exit_code == 0, res
        _check(res.stdout.decode(errors="replace"), NET_MODULES, NET_ONLY_STEPS)
    finally:
        client.stop_pod_sandbox(pod_id)
        client.remove_pod_sandbox(pod_id)
    wait_for(lambda: not qemu_pids(ctd), timeout=30, what="QEMU gone")
