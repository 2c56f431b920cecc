"""Sandbox resources: pure VM sizing (`sizing`), the trio task that converges the VM toward it
(`reconciler`), and the host cgroups that hold QEMU and the shim (`cgroups`)."""
