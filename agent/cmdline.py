"""The agent's settings from the kernel command line (kata_py.channel=, kata_py.log=). Pure."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Channel:
    """How the host reaches the agent: a virtio-serial port name or a vsock port."""

    kind: str  # "serial" | "vsock"
    target: str  # port name, or port number as text


@dataclass(frozen=True)
class BootConfig:
    channel: Channel | None
    log: str = "info"


DEFAULT_CHANNEL = Channel("serial", "agent")


def parse_channel(value: str) -> Channel:
    """Parse `serial:<name>` or `vsock:<port>`. Raises ValueError otherwise."""
    kind, sep, target = value.partition(":")
    if not sep or not target or kind not in ("serial", "vsock"):
        raise ValueError(f"kata_py.channel={value!r}: expected serial:<name> or vsock:<port>")
    if kind == "vsock" and not target.isdigit():
        raise ValueError(f"kata_py.channel={value!r}: vsock port must be a number")
    return Channel(kind, target)


def parse_cmdline(text: str) -> BootConfig:
    """Read our keys from a kernel command line; the channel defaults to serial:agent.

    Raises ValueError for a malformed kata_py.channel (better to fail loudly on the console than to
    listen where the host never dials).
    """
    channel = DEFAULT_CHANNEL
    log = "info"
    for word in text.split():
        key, _, value = word.partition("=")
        if key == "kata_py.channel":
            channel = parse_channel(value)
        elif key == "kata_py.log" and value:
            log = value
    return BootConfig(channel, log)
