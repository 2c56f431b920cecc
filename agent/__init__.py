"""kata-py in-guest agent: PID 1 of the guest, gRPC server, runc/crun driver and reaper."""

__version__ = "0.1.0"
