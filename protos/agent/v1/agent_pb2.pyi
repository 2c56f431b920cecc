from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Storage(_message.Message):
    __slots__ = ("driver", "driver_options", "source", "fstype", "options", "mount_point")
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    DRIVER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    driver: str
    driver_options: _containers.RepeatedScalarFieldContainer[str]
    source: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    mount_point: str
    def __init__(self, driver: _Optional[str] = ..., driver_options: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., mount_point: _Optional[str] = ...) -> None: ...

class KernelModule(_message.Message):
    __slots__ = ("name", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., parameters: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("hostname", "dns", "storages", "sandbox_pidns", "sandbox_id", "kernel_modules", "machine_id")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_PIDNS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_MODULES_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    dns: _containers.RepeatedScalarFieldContainer[str]
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    sandbox_pidns: bool
    sandbox_id: str
    kernel_modules: _containers.RepeatedCompositeFieldContainer[KernelModule]
    machine_id: str
    def __init__(self, hostname: _Optional[str] = ..., dns: _Optional[_Iterable[str]] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., sandbox_pidns: _Optional[bool] = ..., sandbox_id: _Optional[str] = ..., kernel_modules: _Optional[_Iterable[_Union[KernelModule, _Mapping]]] = ..., machine_id: _Optional[str] = ...) -> None: ...

class DestroySandboxRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuestDetailsRequest(_message.Message):
    __slots__ = ("mem_block_size",)
    MEM_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    mem_block_size: bool
    def __init__(self, mem_block_size: _Optional[bool] = ...) -> None: ...

class GuestDetailsResponse(_message.Message):
    __slots__ = ("mem_block_size_bytes", "agent_details", "online_cpus", "mem_total_bytes", "kernel_release")
    MEM_BLOCK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_DETAILS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    mem_block_size_bytes: int
    agent_details: AgentDetails
    online_cpus: int
    mem_total_bytes: int
    kernel_release: str
    def __init__(self, mem_block_size_bytes: _Optional[int] = ..., agent_details: _Optional[_Union[AgentDetails, _Mapping]] = ..., online_cpus: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ..., kernel_release: _Optional[str] = ...) -> None: ...

class AgentDetails(_message.Message):
    __slots__ = ("version", "storage_handlers", "oci_runtime")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STORAGE_HANDLERS_FIELD_NUMBER: _ClassVar[int]
    OCI_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    version: str
    storage_handlers: _containers.RepeatedScalarFieldContainer[str]
    oci_runtime: str
    def __init__(self, version: _Optional[str] = ..., storage_handlers: _Optional[_Iterable[str]] = ..., oci_runtime: _Optional[str] = ...) -> None: ...

class SetGuestDateTimeRequest(_message.Message):
    __slots__ = ("sec", "usec")
    SEC_FIELD_NUMBER: _ClassVar[int]
    USEC_FIELD_NUMBER: _ClassVar[int]
    sec: int
    usec: int
    def __init__(self, sec: _Optional[int] = ..., usec: _Optional[int] = ...) -> None: ...

class ReseedRandomDevRequest(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "type", "vm_path", "container_path", "options")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VM_PATH_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    vm_path: str
    container_path: str
    options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., vm_path: _Optional[str] = ..., container_path: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "oci_spec_json", "storages", "devices", "rootfs", "terminal", "stdin")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    oci_spec_json: bytes
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    rootfs: Storage
    terminal: bool
    stdin: bool
    def __init__(self, container_id: _Optional[str] = ..., oci_spec_json: _Optional[bytes] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., rootfs: _Optional[_Union[Storage, _Mapping]] = ..., terminal: _Optional[bool] = ..., stdin: _Optional[bool] = ...) -> None: ...

class CreateContainerResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class ContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("container_id", "timeout_seconds")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timeout_seconds: int
    def __init__(self, container_id: _Optional[str] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ("container_id", "linux_resources_json")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LINUX_RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    linux_resources_json: bytes
    def __init__(self, container_id: _Optional[str] = ..., linux_resources_json: _Optional[bytes] = ...) -> None: ...

class CpuUsage(_message.Message):
    __slots__ = ("total_usage_ns", "percpu_usage_ns", "usage_in_kernelmode_ns", "usage_in_usermode_ns")
    TOTAL_USAGE_NS_FIELD_NUMBER: _ClassVar[int]
    PERCPU_USAGE_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_IN_KERNELMODE_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_IN_USERMODE_NS_FIELD_NUMBER: _ClassVar[int]
    total_usage_ns: int
    percpu_usage_ns: _containers.RepeatedScalarFieldContainer[int]
    usage_in_kernelmode_ns: int
    usage_in_usermode_ns: int
    def __init__(self, total_usage_ns: _Optional[int] = ..., percpu_usage_ns: _Optional[_Iterable[int]] = ..., usage_in_kernelmode_ns: _Optional[int] = ..., usage_in_usermode_ns: _Optional[int] = ...) -> None: ...

class MemoryStats(_message.Message):
    __slots__ = ("usage", "max_usage", "limit", "cache", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_USAGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    usage: int
    max_usage: int
    limit: int
    cache: int
    stats: _containers.ScalarMap[str, int]
    def __init__(self, usage: _Optional[int] = ..., max_usage: _Optional[int] = ..., limit: _Optional[int] = ..., cache: _Optional[int] = ..., stats: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PidsStats(_message.Message):
    __slots__ = ("current", "limit")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    current: int
    limit: int
    def __init__(self, current: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class StatsContainerResponse(_message.Message):
    __slots__ = ("cpu", "memory", "pids")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    cpu: CpuUsage
    memory: MemoryStats
    pids: PidsStats
    def __init__(self, cpu: _Optional[_Union[CpuUsage, _Mapping]] = ..., memory: _Optional[_Union[MemoryStats, _Mapping]] = ..., pids: _Optional[_Union[PidsStats, _Mapping]] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("pids",)
    PIDS_FIELD_NUMBER: _ClassVar[int]
    pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pids: _Optional[_Iterable[int]] = ...) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "process_json", "terminal", "stdin")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process_json: bytes
    terminal: bool
    stdin: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process_json: _Optional[bytes] = ..., terminal: _Optional[bool] = ..., stdin: _Optional[bool] = ...) -> None: ...

class ExecProcessResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class ProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal", "all")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: int
    def __init__(self, status: _Optional[int] = ...) -> None: ...

class WriteStdinRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "data")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    data: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStdinResponse(_message.Message):
    __slots__ = ("len",)
    LEN_FIELD_NUMBER: _ClassVar[int]
    len: int
    def __init__(self, len: _Optional[int] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TtyWinResizeRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "row", "column")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    row: int
    column: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., row: _Optional[int] = ..., column: _Optional[int] = ...) -> None: ...

class OnlineCPUMemRequest(_message.Message):
    __slots__ = ("wait", "nb_cpus", "cpu_only")
    WAIT_FIELD_NUMBER: _ClassVar[int]
    NB_CPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_ONLY_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    nb_cpus: int
    cpu_only: bool
    def __init__(self, wait: _Optional[bool] = ..., nb_cpus: _Optional[int] = ..., cpu_only: _Optional[bool] = ...) -> None: ...

class OnlineCPUMemResponse(_message.Message):
    __slots__ = ("online_cpus", "mem_total_bytes")
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    online_cpus: int
    mem_total_bytes: int
    def __init__(self, online_cpus: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ...) -> None: ...

class IPAddress(_message.Message):
    __slots__ = ("family", "address", "mask")
    class Family(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        V4: _ClassVar[IPAddress.Family]
        V6: _ClassVar[IPAddress.Family]
    V4: IPAddress.Family
    V6: IPAddress.Family
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    family: IPAddress.Family
    address: str
    mask: str
    def __init__(self, family: _Optional[_Union[IPAddress.Family, str]] = ..., address: _Optional[str] = ..., mask: _Optional[str] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ("device", "name", "ip_addresses", "mtu", "hw_addr")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    HW_ADDR_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    ip_addresses: _containers.RepeatedCompositeFieldContainer[IPAddress]
    mtu: int
    hw_addr: str
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., ip_addresses: _Optional[_Iterable[_Union[IPAddress, _Mapping]]] = ..., mtu: _Optional[int] = ..., hw_addr: _Optional[str] = ...) -> None: ...

class Interfaces(_message.Message):
    __slots__ = ("interfaces",)
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("dest", "gateway", "device", "source", "scope", "family")
    DEST_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    dest: str
    gateway: str
    device: str
    source: str
    scope: int
    family: IPAddress.Family
    def __init__(self, dest: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[int] = ..., family: _Optional[_Union[IPAddress.Family, str]] = ...) -> None: ...

class Routes(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class ARPNeighbor(_message.Message):
    __slots__ = ("to_ip_address", "device", "lladdr", "state", "flags")
    TO_IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LLADDR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    to_ip_address: IPAddress
    device: str
    lladdr: str
    state: int
    flags: int
    def __init__(self, to_ip_address: _Optional[_Union[IPAddress, _Mapping]] = ..., device: _Optional[str] = ..., lladdr: _Optional[str] = ..., state: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class UpdateInterfaceRequest(_message.Message):
    __slots__ = ("interface",)
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    interface: Interface
    def __init__(self, interface: _Optional[_Union[Interface, _Mapping]] = ...) -> None: ...

class UpdateRoutesRequest(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: Routes
    def __init__(self, routes: _Optional[_Union[Routes, _Mapping]] = ...) -> None: ...

class AddARPNeighborsRequest(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[ARPNeighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[ARPNeighbor, _Mapping]]] = ...) -> None: ...

class OOMEvent(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class PortForwardFrame(_message.Message):
    __slots__ = ("port", "family", "data", "connected", "eof")
    PORT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    port: int
    family: int
    data: bytes
    connected: bool
    eof: bool
    def __init__(self, port: _Optional[int] = ..., family: _Optional[int] = ..., data: _Optional[bytes] = ..., connected: _Optional[bool] = ..., eof: _Optional[bool] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("status",)
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[CheckResponse.ServingStatus]
        SERVING: _ClassVar[CheckResponse.ServingStatus]
        NOT_SERVING: _ClassVar[CheckResponse.ServingStatus]
    UNKNOWN: CheckResponse.ServingStatus
    SERVING: CheckResponse.ServingStatus
    NOT_SERVING: CheckResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: CheckResponse.ServingStatus
    def __init__(self, status: _Optional[_Union[CheckResponse.ServingStatus, str]] = ...) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ("grpc_version", "agent_version")
    GRPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    grpc_version: str
    agent_version: str
    def __init__(self, grpc_version: _Optional[str] = ..., agent_version: _Optional[str] = ...) -> None: ...
