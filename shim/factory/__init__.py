"""VM factory: templates (a snapshot of a booted guest, restored instead of booting) and a warm pool.

- `key.py`: which template fits a VM config (pure: hash of guest image, QEMU version, canonical argv).
- `store.py`: the on-disk template cache (atomic commit, validation, size cap, lock per key).
- `template.py`: build a template from a fresh boot; restore a clone from one.
- `pool.py`, `pool_client.py`: `kata-py pool`, a service keeping N restored VMs ready for shims.
"""
