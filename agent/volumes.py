"""Pod volumes: storages that belong to the sandbox, not to one container (Kubernetes emptyDir).

An `ephemeral` storage (a tmpfs; the host's emptyDir was memory-backed) or a `local` one (a plain
directory; disk-backed emptyDir) is made once per pod at `<root>/sandbox/<driver>/<volume>` and shared
by every container that names it. Each container that names it holds a reference; the volume is
removed when the last of them is removed (Kata's sandbox storage refcount).
"""

import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.errors import Internal, InvalidArgument
from agent.paths import resolve_inside
from agent.storage import Mounted, StorageSpec, mount_storage, unmount_storage

POD_DRIVERS = ("ephemeral", "local")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")  # a Kubernetes volume name and then some


@dataclass
class _Volume:
    driver: str
    mounted: Mounted
    users: set[str] = field(default_factory=set)  # container ids


class PodVolumes:
    """Reference-counted pod volumes. Thread-safe (gRPC handlers run in a thread pool)."""

    def __init__(self, root: str, mount: Callable[[StorageSpec, str, str], Mounted] = mount_storage,
                 unmount: Callable[[Mounted], None] = unmount_storage) -> None:
        self.root = root
        self._mount = mount
        self._unmount = unmount
        self._lock = threading.Lock()
        self._volumes: dict[str, _Volume] = {}  # by guest path

    def acquire(self, container_id: str, spec: StorageSpec, field_name: str) -> tuple[str, bool]:
        """Make the volume exist (first user) and count `container_id` as a user. Returns its path and
        whether this call added the reference (so a failed create drops only what it took).

        Raises InvalidArgument when the mount point is not `<root>/sandbox/<driver>/<name>` or names a
        volume of another driver, Internal when mounting fails.
        """
        path = self._path(spec, field_name)
        with self._lock:
            volume = self._volumes.get(path)
            if volume is None:
                volume = _Volume(spec.driver, self._mount(spec, self.root, field_name))
                self._volumes[path] = volume
            elif volume.driver != spec.driver:
                raise InvalidArgument(f"{field_name}: {path} is already a {volume.driver} volume")
            added = container_id not in volume.users
            volume.users.add(container_id)
        return path, added

    def release(self, container_id: str, paths: Iterable[str] | None = None) -> None:
        """Drop `container_id`'s references (to `paths` only, if given); remove the volumes nobody
        uses any more. Raises Internal (after trying every volume) if one cannot be removed."""
        only = None if paths is None else set(paths)
        problems = []
        with self._lock:
            for path, volume in list(self._volumes.items()):
                if container_id not in volume.users or (only is not None and path not in only):
                    continue
                volume.users.discard(container_id)
                if not volume.users:
                    del self._volumes[path]
                    problems += self._remove(volume)
        if problems:
            raise Internal("; ".join(problems))

    def users(self) -> dict[str, set[str]]:
        """Guest path -> ids of the containers using it (a copy, for tests and logs)."""
        with self._lock:
            return {path: set(v.users) for path, v in self._volumes.items()}

    def _remove(self, volume: _Volume) -> list[str]:
        try:
            self._unmount(volume.mounted)
            if volume.mounted.is_mount:
                os.rmdir(volume.mounted.path)  # the now empty mount point
        except (OSError, Internal) as e:
            return [str(e)]
        return []

    def _path(self, spec: StorageSpec, field_name: str) -> str:
        if spec.driver not in POD_DRIVERS:
            raise InvalidArgument(f"{field_name}.driver: {spec.driver!r} is not a pod volume driver")
        parent = os.path.join(self.root, "sandbox", spec.driver)
        path = resolve_inside(self.root, spec.mount_point, f"{field_name}.mount_point")
        if os.path.dirname(path) != os.path.realpath(parent) or not _NAME.fullmatch(os.path.basename(path)):
            # removing a `local` volume deletes its directory tree: it must be nothing else
            raise InvalidArgument(f"{field_name}.mount_point: {spec.mount_point!r} is not {parent}/<volume name>")
        return path
