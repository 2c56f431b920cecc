"""VM templates end to end (issue #9): a miss boots cold and builds the template in the background,
clones restore from it, every clone is its own machine, a corrupted template is rebuilt. Two cold
pod boots, two template builds and two restores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from shim.config import Config, FactoryConfig, HypervisorConfig, RuntimeConfig
from shim.factory.store import STATE_FILE, TemplateStore
from shim.process import Container, Process
from shim.sandbox import VmSandbox
from shim.stdio import HostStdio
from tests.e2e.test_sandbox_vm import collect, make_bundle
from tests.support.containerd import RUNTIME, PrivateContainerd
from tests.support.vmprocs import qemu_pids, qemus_under, wait_for

pytestmark = pytest.mark.vm

# prints 16 random bytes from the clone's kernel CRNG and the guest's wall clock
PROBE = ("head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
         "adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {printf \"%d.%06d\\n\", s, $2}'")
EXTRA_APPLETS = ("head", "od", "tr", "adjtimex", "awk")


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    return tmp_path / "state"


def probe_bundle(root: Path) -> Path:
    bundle = make_bundle(root, ["sh", "-c", PROBE])
    for applet in EXTRA_APPLETS:
        (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
    return bundle


async def run_probe(config: Config, sid: str, bundle: Path) -> tuple[str, str, float, float]:
    """Start a sandbox, run the probe, stop it and let a template build it started finish, as the
    shim daemon does; returns (how it booted, random hex, guest clock, host clock)."""
    spec = json.loads((bundle / "config.json").read_text())
    async with trio.open_nursery() as nursery:
        sandbox = VmSandbox(sid, config, nursery)
        container = Container(sid, str(bundle), spec, True, Process(sid, "", HostStdio(False), False))
        try:
            with trio.fail_after(240):
                await sandbox.create_container(container)
                await sandbox.agent.start_container(sid)
                out = await collect(sandbox.agent.read_stdout(sid, ""))
                host_now = time.time()
                assert await sandbox.agent.wait_process(sid, "") == 0
            await sandbox.remove_container(container)
        finally:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
                await sandbox.wait_background(300)
        nursery.cancel_scope.cancel()
    rand, clock = out.decode().split()
    return sandbox.boot, rand, float(clock), host_now


async def test_clones_of_one_template_are_distinct_machines_and_a_corrupt_template_is_rebuilt(
        tmp_path: Path, state_root: Path):
    templates = tmp_path / "templates"
    guest = Config().guest_dir().resolve()  # pinned: a guest rebuilt meanwhile would change the key
    config = Config(hypervisor=HypervisorConfig(guest_dir=str(guest)), runtime=RuntimeConfig(state_dir=str(state_root)),
                    factory=FactoryConfig(template_dir=str(templates)))
    bundle = probe_bundle(tmp_path)

    first = await run_probe(config, "tpl-a", bundle)  # miss: boots cold, builds the template afterwards
    assert first[0] == "cold"
    [template] = TemplateStore(templates).list()
    assert not list((state_root / "tb").glob("*")), "the build left its work dir"
    second = await run_probe(config, "tpl-b", bundle)  # hit
    third = await run_probe(config, "tpl-c", bundle)
    assert second[0] == third[0] == "template"

    # every clone is its own machine: different CRNG output, the host's wall clock (to the second)
    assert second[1] != third[1] and len(second[1]) == 32
    for _, _, guest_clock, host_clock in (first, second, third):
        assert abs(guest_clock - host_clock) < 1.0, (guest_clock, host_clock)

    # a truncated state file is detected, the template rebuilt (never half-used)
    state = template.path / STATE_FILE
    state.chmod(0o600)
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 2)
    fourth = await run_probe(config, "tpl-d", bundle)
    assert fourth[0] == "cold"  # never half-used: booted cold, and rebuilt it meanwhile
    assert TemplateStore(templates).validate(template.key).meta["created"] > template.meta["created"]


@pytest.mark.containerd
def test_first_pod_without_a_template_boots_cold_and_its_shim_leaves_one(tmp_path: Path):
    """Through containerd: `ctr run --rm` of a first pod returns once it ran (cold), its shim builds
    the template after it stopped serving and then exits; the next pod restores from it."""
    templates = tmp_path / "templates"
    ctd = PrivateContainerd(kata_config=f'[factory]\ntemplate_dir = "{templates}"\n').start()
    try:
        image = ctd.import_busybox()
        ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "first", "true", timeout=300)
        assert "boot=cold" in ctd.log.read_text(errors="replace")
        assert not qemus_under(ctd.kata_state / "sandboxes"), "the pod's own VM outlived ctr run --rm"
        wait_for(lambda: TemplateStore(templates).list(), 180, "the template the first shim builds")
        wait_for(lambda: not ctd.stray_processes(), 60, "the first shim to exit after its build")
        ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "second", "true", timeout=300)
        assert ctd.log.read_text(errors="replace").count("boot=template") == 1
        assert not qemu_pids(ctd)
    finally:
        ctd.cleanup()
