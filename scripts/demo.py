#!/usr/bin/env python3
"""Start a private containerd configured with kata-py, import a local busybox image, run it in a VM.

    python3 scripts/demo.py [COMMAND...]      (default: uname -a; cat /proc/cpuinfo | grep -c processor)

Everything lives in a temp dir and is removed at the end; nothing touches the host's containerd.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.containerd import RUNTIME, PrivateContainerd  # noqa: E402


def main() -> int:
    command = sys.argv[1:] or ["sh", "-c", "echo hello from a kata-py VM; uname -a; nproc; free -m"]
    ctd = PrivateContainerd()
    try:
        # as at install time: the VM template for this configuration (a first build boots a guest,
        # ~15-30 s under TCG; later runs find it in the cache), so the run below restores it
        subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "template", "build"],
                       check=True, timeout=900)
        ctd.start()
        print(f"[demo] private containerd at {ctd.address} (state in {ctd.dir})")
        image = ctd.import_busybox()
        print(f"[demo] imported {image}; running: ctr run --rm --runtime {RUNTIME} {image} demo {' '.join(command)}")
        t0 = time.monotonic()
        result = ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "demo", *command, check=False, timeout=600)
        sys.stdout.write(result.stdout.decode(errors="replace"))
        sys.stderr.write(result.stderr.decode(errors="replace"))
        print(f"[demo] exit status {result.returncode} after {time.monotonic() - t0:.1f} s "
              f"(host kernel {Path('/proc/sys/kernel/osrelease').read_text().strip()})")
        return result.returncode
    finally:
        ctd.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
