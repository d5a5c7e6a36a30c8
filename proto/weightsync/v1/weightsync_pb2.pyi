from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DaemonState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DAEMON_STATE_UNSPECIFIED: _ClassVar[DaemonState]
    DAEMON_STATE_IDLE: _ClassVar[DaemonState]
    DAEMON_STATE_UPDATING: _ClassVar[DaemonState]
    DAEMON_STATE_LOST: _ClassVar[DaemonState]
    DAEMON_STATE_DRAINING: _ClassVar[DaemonState]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_TRANSFERRING: _ClassVar[RoundState]
    ROUND_STATE_COMMITTED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]
    ROUND_STATE_ABORTED: _ClassVar[RoundState]
    ROUND_STATE_TIMED_OUT: _ClassVar[RoundState]

class ResultStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_STATUS_UNSPECIFIED: _ClassVar[ResultStatus]
    RESULT_STATUS_PENDING: _ClassVar[ResultStatus]
    RESULT_STATUS_OK: _ClassVar[ResultStatus]
    RESULT_STATUS_CHECKSUM_MISMATCH: _ClassVar[ResultStatus]
    RESULT_STATUS_FAILED: _ClassVar[ResultStatus]
    RESULT_STATUS_TIMED_OUT: _ClassVar[ResultStatus]
DAEMON_STATE_UNSPECIFIED: DaemonState
DAEMON_STATE_IDLE: DaemonState
DAEMON_STATE_UPDATING: DaemonState
DAEMON_STATE_LOST: DaemonState
DAEMON_STATE_DRAINING: DaemonState
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_TRANSFERRING: RoundState
ROUND_STATE_COMMITTED: RoundState
ROUND_STATE_FAILED: RoundState
ROUND_STATE_ABORTED: RoundState
ROUND_STATE_TIMED_OUT: RoundState
RESULT_STATUS_UNSPECIFIED: ResultStatus
RESULT_STATUS_PENDING: ResultStatus
RESULT_STATUS_OK: ResultStatus
RESULT_STATUS_CHECKSUM_MISMATCH: ResultStatus
RESULT_STATUS_FAILED: ResultStatus
RESULT_STATUS_TIMED_OUT: ResultStatus

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class BucketEntry(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset_bytes", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    offset_bytes: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., offset_bytes: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Bucket(_message.Message):
    __slots__ = ("index", "size_bytes", "entries")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    index: int
    size_bytes: int
    entries: _containers.RepeatedCompositeFieldContainer[BucketEntry]
    def __init__(self, index: _Optional[int] = ..., size_bytes: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[BucketEntry, _Mapping]]] = ...) -> None: ...

class BucketPlan(_message.Message):
    __slots__ = ("buckets", "total_bytes", "digest")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    total_bytes: int
    digest: str
    def __init__(self, buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("transport", "host", "port", "world_size", "group_id", "timeout_s")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    transport: str
    host: str
    port: int
    world_size: int
    group_id: str
    timeout_s: float
    def __init__(self, transport: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., world_size: _Optional[int] = ..., group_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("daemon_id", "ranks", "encoding")
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    daemon_id: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    encoding: str
    def __init__(self, daemon_id: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ..., encoding: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("update_id", "version", "rendezvous", "participants", "plan", "deadline_s", "delta_base_version", "routing")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    version: int
    rendezvous: Rendezvous
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    plan: BucketPlan
    deadline_s: float
    delta_base_version: int
    routing: RoutingPlan
    def __init__(self, update_id: _Optional[str] = ..., version: _Optional[int] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., plan: _Optional[_Union[BucketPlan, _Mapping]] = ..., deadline_s: _Optional[float] = ..., delta_base_version: _Optional[int] = ..., routing: _Optional[_Union[RoutingPlan, _Mapping]] = ...) -> None: ...

class RoutedPiece(_message.Message):
    __slots__ = ("name", "box", "sender", "receivers", "bucket", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    box: _containers.RepeatedScalarFieldContainer[int]
    sender: int
    receivers: _containers.RepeatedScalarFieldContainer[int]
    bucket: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., box: _Optional[_Iterable[int]] = ..., sender: _Optional[int] = ..., receivers: _Optional[_Iterable[int]] = ..., bucket: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class RoutingPlan(_message.Message):
    __slots__ = ("num_senders", "num_buckets", "pieces", "digest")
    NUM_SENDERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    num_senders: int
    num_buckets: int
    pieces: _containers.RepeatedCompositeFieldContainer[RoutedPiece]
    digest: str
    def __init__(self, num_senders: _Optional[int] = ..., num_buckets: _Optional[int] = ..., pieces: _Optional[_Iterable[_Union[RoutedPiece, _Mapping]]] = ..., digest: _Optional[str] = ...) -> None: ...

class PieceChecksum(_message.Message):
    __slots__ = ("rank", "piece", "sum")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    rank: int
    piece: int
    sum: int
    def __init__(self, rank: _Optional[int] = ..., piece: _Optional[int] = ..., sum: _Optional[int] = ...) -> None: ...

class RankBytes(_message.Message):
    __slots__ = ("rank", "daemon_id", "bytes_sent", "bytes_received")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    daemon_id: str
    bytes_sent: int
    bytes_received: int
    def __init__(self, rank: _Optional[int] = ..., daemon_id: _Optional[str] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class TensorChecksum(_message.Message):
    __slots__ = ("name", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    checksum: int
    def __init__(self, name: _Optional[str] = ..., checksum: _Optional[int] = ...) -> None: ...

class DaemonResult(_message.Message):
    __slots__ = ("daemon_id", "status", "reason", "mismatched_tensors", "receive_s", "apply_s", "bytes_received", "timeline")
    class TimelineEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    APPLY_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    daemon_id: str
    status: ResultStatus
    reason: str
    mismatched_tensors: _containers.RepeatedScalarFieldContainer[str]
    receive_s: float
    apply_s: float
    bytes_received: int
    timeline: _containers.ScalarMap[str, float]
    def __init__(self, daemon_id: _Optional[str] = ..., status: _Optional[_Union[ResultStatus, str]] = ..., reason: _Optional[str] = ..., mismatched_tensors: _Optional[_Iterable[str]] = ..., receive_s: _Optional[float] = ..., apply_s: _Optional[float] = ..., bytes_received: _Optional[int] = ..., timeline: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("dim", "start", "length")
    DIM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    dim: int
    start: int
    length: int
    def __init__(self, dim: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class TensorRegion(_message.Message):
    __slots__ = ("name", "region")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    name: str
    region: Region
    def __init__(self, name: _Optional[str] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class RankRegions(_message.Message):
    __slots__ = ("rank", "regions", "whole_fallbacks")
    RANK_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    regions: _containers.RepeatedCompositeFieldContainer[TensorRegion]
    whole_fallbacks: int
    def __init__(self, rank: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[TensorRegion, _Mapping]]] = ..., whole_fallbacks: _Optional[int] = ...) -> None: ...

class RegisterDaemonRequest(_message.Message):
    __slots__ = ("daemon_id", "engine", "model", "host", "num_ranks", "inventory", "transports", "served_version", "dirty", "resume_token", "needs")
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    daemon_id: str
    engine: str
    model: str
    host: str
    num_ranks: int
    inventory: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    transports: _containers.RepeatedScalarFieldContainer[str]
    served_version: int
    dirty: bool
    resume_token: str
    needs: _containers.RepeatedCompositeFieldContainer[RankRegions]
    def __init__(self, daemon_id: _Optional[str] = ..., engine: _Optional[str] = ..., model: _Optional[str] = ..., host: _Optional[str] = ..., num_ranks: _Optional[int] = ..., inventory: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., transports: _Optional[_Iterable[str]] = ..., served_version: _Optional[int] = ..., dirty: _Optional[bool] = ..., resume_token: _Optional[str] = ..., needs: _Optional[_Iterable[_Union[RankRegions, _Mapping]]] = ...) -> None: ...

class RegisterDaemonResponse(_message.Message):
    __slots__ = ("session_token", "heartbeat_interval_s", "heartbeat_timeout_s", "stale", "unknown_version")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    stale: bool
    unknown_version: bool
    def __init__(self, session_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., stale: _Optional[bool] = ..., unknown_version: _Optional[bool] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("daemon_id", "session_token")
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    daemon_id: str
    session_token: str
    def __init__(self, daemon_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("served_version", "dirty", "busy_update_id", "draining", "holds_delta_base", "holds_needed_delta_base")
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    BUSY_UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    HOLDS_DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    HOLDS_NEEDED_DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    served_version: int
    dirty: bool
    busy_update_id: str
    draining: bool
    holds_delta_base: bool
    holds_needed_delta_base: bool
    def __init__(self, served_version: _Optional[int] = ..., dirty: _Optional[bool] = ..., busy_update_id: _Optional[str] = ..., draining: _Optional[bool] = ..., holds_delta_base: _Optional[bool] = ..., holds_needed_delta_base: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("update_id", "buckets_done", "bytes_done")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    buckets_done: int
    bytes_done: int
    def __init__(self, update_id: _Optional[str] = ..., buckets_done: _Optional[int] = ..., bytes_done: _Optional[int] = ...) -> None: ...

class UpdateResult(_message.Message):
    __slots__ = ("update_id", "ok", "error", "checksums", "receive_s", "apply_s", "bytes_received", "holds_delta_base", "piece_sums", "timeline", "holds_needed_delta_base")
    class TimelineEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    APPLY_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    HOLDS_DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    PIECE_SUMS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    HOLDS_NEEDED_DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    ok: bool
    error: str
    checksums: _containers.RepeatedCompositeFieldContainer[TensorChecksum]
    receive_s: float
    apply_s: float
    bytes_received: int
    holds_delta_base: bool
    piece_sums: _containers.RepeatedCompositeFieldContainer[PieceChecksum]
    timeline: _containers.ScalarMap[str, float]
    holds_needed_delta_base: bool
    def __init__(self, update_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., checksums: _Optional[_Iterable[_Union[TensorChecksum, _Mapping]]] = ..., receive_s: _Optional[float] = ..., apply_s: _Optional[float] = ..., bytes_received: _Optional[int] = ..., holds_delta_base: _Optional[bool] = ..., piece_sums: _Optional[_Iterable[_Union[PieceChecksum, _Mapping]]] = ..., timeline: _Optional[_Mapping[str, float]] = ..., holds_needed_delta_base: _Optional[bool] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "progress", "result")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    hello: SessionHello
    heartbeat: Heartbeat
    progress: Progress
    result: UpdateResult
    def __init__(self, hello: _Optional[_Union[SessionHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[UpdateResult, _Mapping]] = ...) -> None: ...

class CancelUpdate(_message.Message):
    __slots__ = ("update_id", "reason")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    reason: str
    def __init__(self, update_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UpdateVerdict(_message.Message):
    __slots__ = ("update_id", "version", "state", "status", "reason")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    version: int
    state: RoundState
    status: ResultStatus
    reason: str
    def __init__(self, update_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., status: _Optional[_Union[ResultStatus, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("assignment", "cancel", "verdict")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    cancel: CancelUpdate
    verdict: UpdateVerdict
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelUpdate, _Mapping]] = ..., verdict: _Optional[_Union[UpdateVerdict, _Mapping]] = ...) -> None: ...

class UpdateOptions(_message.Message):
    __slots__ = ("transport", "bucket_size_bytes", "deadline_s", "min_daemons", "daemon_ids", "rendezvous_host", "rendezvous_port", "collective_timeout_s", "delta_base_version")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_DAEMONS_FIELD_NUMBER: _ClassVar[int]
    DAEMON_IDS_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_HOST_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_PORT_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    transport: str
    bucket_size_bytes: int
    deadline_s: float
    min_daemons: int
    daemon_ids: _containers.RepeatedScalarFieldContainer[str]
    rendezvous_host: str
    rendezvous_port: int
    collective_timeout_s: float
    delta_base_version: int
    def __init__(self, transport: _Optional[str] = ..., bucket_size_bytes: _Optional[int] = ..., deadline_s: _Optional[float] = ..., min_daemons: _Optional[int] = ..., daemon_ids: _Optional[_Iterable[str]] = ..., rendezvous_host: _Optional[str] = ..., rendezvous_port: _Optional[int] = ..., collective_timeout_s: _Optional[float] = ..., delta_base_version: _Optional[int] = ...) -> None: ...

class BeginUpdateRequest(_message.Message):
    __slots__ = ("version", "manifest", "options", "holds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    options: UpdateOptions
    holds: _containers.RepeatedCompositeFieldContainer[RankRegions]
    def __init__(self, version: _Optional[int] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., options: _Optional[_Union[UpdateOptions, _Mapping]] = ..., holds: _Optional[_Iterable[_Union[RankRegions, _Mapping]]] = ...) -> None: ...

class BeginUpdateResponse(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ...) -> None: ...

class CommitUpdateRequest(_message.Message):
    __slots__ = ("update_id", "checksums", "sender_s", "piece_sums")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    SENDER_S_FIELD_NUMBER: _ClassVar[int]
    PIECE_SUMS_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    checksums: _containers.RepeatedCompositeFieldContainer[TensorChecksum]
    sender_s: float
    piece_sums: _containers.RepeatedCompositeFieldContainer[PieceChecksum]
    def __init__(self, update_id: _Optional[str] = ..., checksums: _Optional[_Iterable[_Union[TensorChecksum, _Mapping]]] = ..., sender_s: _Optional[float] = ..., piece_sums: _Optional[_Iterable[_Union[PieceChecksum, _Mapping]]] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("update_id", "version", "state", "participants", "results", "total_bytes", "num_tensors", "started_unix_s", "duration_s", "reason", "transport", "rank_bytes")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RANK_BYTES_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    version: int
    state: RoundState
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    results: _containers.RepeatedCompositeFieldContainer[DaemonResult]
    total_bytes: int
    num_tensors: int
    started_unix_s: float
    duration_s: float
    reason: str
    transport: str
    rank_bytes: _containers.RepeatedCompositeFieldContainer[RankBytes]
    def __init__(self, update_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[DaemonResult, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., num_tensors: _Optional[int] = ..., started_unix_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., reason: _Optional[str] = ..., transport: _Optional[str] = ..., rank_bytes: _Optional[_Iterable[_Union[RankBytes, _Mapping]]] = ...) -> None: ...

class CommitUpdateResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ...) -> None: ...

class AbortUpdateRequest(_message.Message):
    __slots__ = ("update_id", "reason")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    reason: str
    def __init__(self, update_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortUpdateResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ...) -> None: ...

class WatchUpdateRequest(_message.Message):
    __slots__ = ("update_id",)
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    def __init__(self, update_id: _Optional[str] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("update_id", "state", "reason")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    state: RoundState
    reason: str
    def __init__(self, update_id: _Optional[str] = ..., state: _Optional[_Union[RoundState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class DaemonInfo(_message.Message):
    __slots__ = ("daemon_id", "state", "engine", "model", "host", "num_ranks", "served_version", "last_heartbeat_unix_s", "dirty", "stale", "num_tensors", "transports", "reason", "unknown_version", "needed_bytes_per_rank", "whole_fallbacks")
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEEDED_BYTES_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    daemon_id: str
    state: DaemonState
    engine: str
    model: str
    host: str
    num_ranks: int
    served_version: int
    last_heartbeat_unix_s: float
    dirty: bool
    stale: bool
    num_tensors: int
    transports: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    unknown_version: bool
    needed_bytes_per_rank: _containers.RepeatedScalarFieldContainer[int]
    whole_fallbacks: int
    def __init__(self, daemon_id: _Optional[str] = ..., state: _Optional[_Union[DaemonState, str]] = ..., engine: _Optional[str] = ..., model: _Optional[str] = ..., host: _Optional[str] = ..., num_ranks: _Optional[int] = ..., served_version: _Optional[int] = ..., last_heartbeat_unix_s: _Optional[float] = ..., dirty: _Optional[bool] = ..., stale: _Optional[bool] = ..., num_tensors: _Optional[int] = ..., transports: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., unknown_version: _Optional[bool] = ..., needed_bytes_per_rank: _Optional[_Iterable[int]] = ..., whole_fallbacks: _Optional[int] = ...) -> None: ...

class ListDaemonsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDaemonsResponse(_message.Message):
    __slots__ = ("daemons", "committed_version", "version_floor")
    DAEMONS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FLOOR_FIELD_NUMBER: _ClassVar[int]
    daemons: _containers.RepeatedCompositeFieldContainer[DaemonInfo]
    committed_version: int
    version_floor: int
    def __init__(self, daemons: _Optional[_Iterable[_Union[DaemonInfo, _Mapping]]] = ..., committed_version: _Optional[int] = ..., version_floor: _Optional[int] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("update_id",)
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    def __init__(self, update_id: _Optional[str] = ...) -> None: ...

class GetRoundResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ...) -> None: ...
