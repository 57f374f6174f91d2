from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    D_TYPE_UNSPECIFIED: _ClassVar[DType]
    D_TYPE_FLOAT16: _ClassVar[DType]
    D_TYPE_FLOAT32: _ClassVar[DType]
    D_TYPE_INT32: _ClassVar[DType]
    D_TYPE_INT64: _ClassVar[DType]
    D_TYPE_UINT8: _ClassVar[DType]
    D_TYPE_BOOL: _ClassVar[DType]

class Randomness(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANDOMNESS_UNSPECIFIED: _ClassVar[Randomness]
    RANDOMNESS_FIXED: _ClassVar[Randomness]
    RANDOMNESS_PER_CALL: _ClassVar[Randomness]

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    GRANULARITY_TOKEN: _ClassVar[Granularity]
    GRANULARITY_BLOCK: _ClassVar[Granularity]

class AttnReduce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTN_REDUCE_UNSPECIFIED: _ClassVar[AttnReduce]
    ATTN_REDUCE_SUM: _ClassVar[AttnReduce]
    ATTN_REDUCE_MEAN: _ClassVar[AttnReduce]

class PoolReduce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOL_REDUCE_UNSPECIFIED: _ClassVar[PoolReduce]
    POOL_REDUCE_MAX: _ClassVar[PoolReduce]
    POOL_REDUCE_MEAN: _ClassVar[PoolReduce]

class Prior(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIOR_UNSPECIFIED: _ClassVar[Prior]
    PRIOR_KEY_DIVERSITY: _ClassVar[Prior]
    PRIOR_KEY_NORM: _ClassVar[Prior]
    PRIOR_VALUE_NORM: _ClassVar[Prior]

class BudgetAlloc(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_ALLOC_UNSPECIFIED: _ClassVar[BudgetAlloc]
    BUDGET_ALLOC_FIXED: _ClassVar[BudgetAlloc]
    BUDGET_ALLOC_SHARED: _ClassVar[BudgetAlloc]

class ReactCalls(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REACT_CALLS_UNSPECIFIED: _ClassVar[ReactCalls]
    REACT_CALLS_ALL: _ClassVar[ReactCalls]
    REACT_CALLS_QUESTION: _ClassVar[ReactCalls]

class CallKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALL_KIND_UNSPECIFIED: _ClassVar[CallKind]
    CALL_KIND_CONTEXT: _ClassVar[CallKind]
    CALL_KIND_QUESTION: _ClassVar[CallKind]
    CALL_KIND_DECODE: _ClassVar[CallKind]
D_TYPE_UNSPECIFIED: DType
D_TYPE_FLOAT16: DType
D_TYPE_FLOAT32: DType
D_TYPE_INT32: DType
D_TYPE_INT64: DType
D_TYPE_UINT8: DType
D_TYPE_BOOL: DType
RANDOMNESS_UNSPECIFIED: Randomness
RANDOMNESS_FIXED: Randomness
RANDOMNESS_PER_CALL: Randomness
GRANULARITY_UNSPECIFIED: Granularity
GRANULARITY_TOKEN: Granularity
GRANULARITY_BLOCK: Granularity
ATTN_REDUCE_UNSPECIFIED: AttnReduce
ATTN_REDUCE_SUM: AttnReduce
ATTN_REDUCE_MEAN: AttnReduce
POOL_REDUCE_UNSPECIFIED: PoolReduce
POOL_REDUCE_MAX: PoolReduce
POOL_REDUCE_MEAN: PoolReduce
PRIOR_UNSPECIFIED: Prior
PRIOR_KEY_DIVERSITY: Prior
PRIOR_KEY_NORM: Prior
PRIOR_VALUE_NORM: Prior
BUDGET_ALLOC_UNSPECIFIED: BudgetAlloc
BUDGET_ALLOC_FIXED: BudgetAlloc
BUDGET_ALLOC_SHARED: BudgetAlloc
REACT_CALLS_UNSPECIFIED: ReactCalls
REACT_CALLS_ALL: ReactCalls
REACT_CALLS_QUESTION: ReactCalls
CALL_KIND_UNSPECIFIED: CallKind
CALL_KIND_CONTEXT: CallKind
CALL_KIND_QUESTION: CallKind
CALL_KIND_DECODE: CallKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PolicyConfig(_message.Message):
    __slots__ = ("policy", "budget", "slack", "sinks", "recent", "groups", "beta", "iterations", "fanout", "gamma", "tau", "randomness", "seed", "pool", "granularity", "block_size", "attn_reduce", "pool_reduce", "prior", "prior_mix", "prior_sharpness", "react_calls", "question_prior_mix", "budget_alloc", "budget_floor")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SLACK_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    FANOUT_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    RANDOMNESS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTN_REDUCE_FIELD_NUMBER: _ClassVar[int]
    POOL_REDUCE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    PRIOR_MIX_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    REACT_CALLS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_PRIOR_MIX_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ALLOC_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FLOOR_FIELD_NUMBER: _ClassVar[int]
    policy: str
    budget: int
    slack: int
    sinks: int
    recent: int
    groups: int
    beta: float
    iterations: int
    fanout: int
    gamma: float
    tau: float
    randomness: Randomness
    seed: int
    pool: int
    granularity: Granularity
    block_size: int
    attn_reduce: AttnReduce
    pool_reduce: PoolReduce
    prior: Prior
    prior_mix: float
    prior_sharpness: float
    react_calls: ReactCalls
    question_prior_mix: float
    budget_alloc: BudgetAlloc
    budget_floor: float
    def __init__(self, policy: _Optional[str] = ..., budget: _Optional[int] = ..., slack: _Optional[int] = ..., sinks: _Optional[int] = ..., recent: _Optional[int] = ..., groups: _Optional[int] = ..., beta: _Optional[float] = ..., iterations: _Optional[int] = ..., fanout: _Optional[int] = ..., gamma: _Optional[float] = ..., tau: _Optional[float] = ..., randomness: _Optional[_Union[Randomness, str]] = ..., seed: _Optional[int] = ..., pool: _Optional[int] = ..., granularity: _Optional[_Union[Granularity, str]] = ..., block_size: _Optional[int] = ..., attn_reduce: _Optional[_Union[AttnReduce, str]] = ..., pool_reduce: _Optional[_Union[PoolReduce, str]] = ..., prior: _Optional[_Union[Prior, str]] = ..., prior_mix: _Optional[float] = ..., prior_sharpness: _Optional[float] = ..., react_calls: _Optional[_Union[ReactCalls, str]] = ..., question_prior_mix: _Optional[float] = ..., budget_alloc: _Optional[_Union[BudgetAlloc, str]] = ..., budget_floor: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "config")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: PolicyConfig
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[PolicyConfig, _Mapping]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "config", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: PolicyConfig
    step: int
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[PolicyConfig, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("session_id", "step", "retained_count", "retained_checksum", "new_positions", "attn", "last", "edge_index", "edge_weight", "key_diversity", "key_norm", "value_norm", "call")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RETAINED_COUNT_FIELD_NUMBER: _ClassVar[int]
    RETAINED_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    NEW_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ATTN_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    EDGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    EDGE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KEY_DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    KEY_NORM_FIELD_NUMBER: _ClassVar[int]
    VALUE_NORM_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    retained_count: int
    retained_checksum: int
    new_positions: Tensor
    attn: Tensor
    last: Tensor
    edge_index: Tensor
    edge_weight: Tensor
    key_diversity: Tensor
    key_norm: Tensor
    value_norm: Tensor
    call: CallKind
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., retained_count: _Optional[int] = ..., retained_checksum: _Optional[int] = ..., new_positions: _Optional[_Union[Tensor, _Mapping]] = ..., attn: _Optional[_Union[Tensor, _Mapping]] = ..., last: _Optional[_Union[Tensor, _Mapping]] = ..., edge_index: _Optional[_Union[Tensor, _Mapping]] = ..., edge_weight: _Optional[_Union[Tensor, _Mapping]] = ..., key_diversity: _Optional[_Union[Tensor, _Mapping]] = ..., key_norm: _Optional[_Union[Tensor, _Mapping]] = ..., value_norm: _Optional[_Union[Tensor, _Mapping]] = ..., call: _Optional[_Union[CallKind, str]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[SessionStep]
    def __init__(self, steps: _Optional[_Iterable[_Union[SessionStep, _Mapping]]] = ...) -> None: ...

class StepBatchRequest(_message.Message):
    __slots__ = ("session_ids", "steps", "retained_counts", "retained_checksums", "retained_slots", "token_offsets", "slot_offsets", "edge_offsets", "new_positions", "attn", "last", "edge_index", "edge_weight", "key_diversity", "key_norm", "value_norm", "calls")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SLOT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    EDGE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    NEW_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ATTN_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    EDGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    EDGE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KEY_DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    KEY_NORM_FIELD_NUMBER: _ClassVar[int]
    VALUE_NORM_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    steps: bytes
    retained_counts: bytes
    retained_checksums: bytes
    retained_slots: bytes
    token_offsets: bytes
    slot_offsets: bytes
    edge_offsets: bytes
    new_positions: Tensor
    attn: Tensor
    last: Tensor
    edge_index: Tensor
    edge_weight: Tensor
    key_diversity: Tensor
    key_norm: Tensor
    value_norm: Tensor
    calls: bytes
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., steps: _Optional[bytes] = ..., retained_counts: _Optional[bytes] = ..., retained_checksums: _Optional[bytes] = ..., retained_slots: _Optional[bytes] = ..., token_offsets: _Optional[bytes] = ..., slot_offsets: _Optional[bytes] = ..., edge_offsets: _Optional[bytes] = ..., new_positions: _Optional[_Union[Tensor, _Mapping]] = ..., attn: _Optional[_Union[Tensor, _Mapping]] = ..., last: _Optional[_Union[Tensor, _Mapping]] = ..., edge_index: _Optional[_Union[Tensor, _Mapping]] = ..., edge_weight: _Optional[_Union[Tensor, _Mapping]] = ..., key_diversity: _Optional[_Union[Tensor, _Mapping]] = ..., key_norm: _Optional[_Union[Tensor, _Mapping]] = ..., value_norm: _Optional[_Union[Tensor, _Mapping]] = ..., calls: _Optional[bytes] = ...) -> None: ...

class StepBatchResponse(_message.Message):
    __slots__ = ("steps", "retained_counts", "retained_checksums", "keep", "evicted", "evicted_offsets")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    steps: bytes
    retained_counts: bytes
    retained_checksums: bytes
    keep: bytes
    evicted: bytes
    evicted_offsets: bytes
    def __init__(self, steps: _Optional[bytes] = ..., retained_counts: _Optional[bytes] = ..., retained_checksums: _Optional[bytes] = ..., keep: _Optional[bytes] = ..., evicted: _Optional[bytes] = ..., evicted_offsets: _Optional[bytes] = ...) -> None: ...

class GroupEvictions(_message.Message):
    __slots__ = ("group", "positions")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    group: int
    positions: Tensor
    def __init__(self, group: _Optional[int] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionResult(_message.Message):
    __slots__ = ("session_id", "step", "keep", "evicted", "retained_count", "retained_checksum")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    RETAINED_COUNT_FIELD_NUMBER: _ClassVar[int]
    RETAINED_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    keep: Tensor
    evicted: _containers.RepeatedCompositeFieldContainer[GroupEvictions]
    retained_count: int
    retained_checksum: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., keep: _Optional[_Union[Tensor, _Mapping]] = ..., evicted: _Optional[_Iterable[_Union[GroupEvictions, _Mapping]]] = ..., retained_count: _Optional[int] = ..., retained_checksum: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SessionResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SessionResult, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_weights")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_weights: bool
    def __init__(self, session_id: _Optional[str] = ..., include_weights: bool = ...) -> None: ...

class WeightSummary(_message.Message):
    __slots__ = ("min", "max", "mean", "p50", "p90")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P90_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    mean: float
    p50: float
    p90: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ..., p50: _Optional[float] = ..., p90: _Optional[float] = ...) -> None: ...

class GroupRetention(_message.Message):
    __slots__ = ("group", "positions", "weight_summary", "weights")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    group: int
    positions: Tensor
    weight_summary: WeightSummary
    weights: Tensor
    def __init__(self, group: _Optional[int] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., weight_summary: _Optional[_Union[WeightSummary, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session_id", "config", "step", "groups", "tokens_seen", "tokens_evicted", "retained_count", "retained_checksum")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    RETAINED_COUNT_FIELD_NUMBER: _ClassVar[int]
    RETAINED_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: PolicyConfig
    step: int
    groups: _containers.RepeatedCompositeFieldContainer[GroupRetention]
    tokens_seen: int
    tokens_evicted: int
    retained_count: int
    retained_checksum: int
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[PolicyConfig, _Mapping]] = ..., step: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[GroupRetention, _Mapping]]] = ..., tokens_seen: _Optional[int] = ..., tokens_evicted: _Optional[int] = ..., retained_count: _Optional[int] = ..., retained_checksum: _Optional[int] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "description", "defaults")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    defaults: PolicyConfig
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., defaults: _Optional[_Union[PolicyConfig, _Mapping]] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ...) -> None: ...

class ResyncRequest(_message.Message):
    __slots__ = ("session_id", "config", "step", "retained")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: PolicyConfig
    step: int
    retained: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[PolicyConfig, _Mapping]] = ..., step: _Optional[int] = ..., retained: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class ResyncResponse(_message.Message):
    __slots__ = ("session_id", "config", "step", "retained_count", "retained_checksum", "known", "admitted", "previous_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RETAINED_COUNT_FIELD_NUMBER: _ClassVar[int]
    RETAINED_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: PolicyConfig
    step: int
    retained_count: int
    retained_checksum: int
    known: int
    admitted: int
    previous_step: int
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[PolicyConfig, _Mapping]] = ..., step: _Optional[int] = ..., retained_count: _Optional[int] = ..., retained_checksum: _Optional[int] = ..., known: _Optional[int] = ..., admitted: _Optional[int] = ..., previous_step: _Optional[int] = ...) -> None: ...
