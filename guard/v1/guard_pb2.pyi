from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ALLOW: _ClassVar[Outcome]
    OUTCOME_BLOCK: _ClassVar[Outcome]
    OUTCOME_WOULD_BLOCK: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ALLOW: Outcome
OUTCOME_BLOCK: Outcome
OUTCOME_WOULD_BLOCK: Outcome

class Image(_message.Message):
    __slots__ = ("data", "url")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    url: str
    def __init__(self, data: _Optional[bytes] = ..., url: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("text", "images", "return_images", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    return_images: bool
    request_id: str
    def __init__(self, text: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., return_images: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class StageDecision(_message.Message):
    __slots__ = ("stage", "action", "reason", "category", "score", "details")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    action: str
    reason: str
    category: str
    score: float
    details: _struct_pb2.Struct
    def __init__(self, stage: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CheckedImage(_message.Message):
    __slots__ = ("index", "digest", "png", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    digest: str
    png: bytes
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., digest: _Optional[str] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("request_id", "outcome", "decisions", "images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outcome: Outcome
    decisions: _containers.RepeatedCompositeFieldContainer[StageDecision]
    images: _containers.RepeatedCompositeFieldContainer[CheckedImage]
    def __init__(self, request_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., decisions: _Optional[_Iterable[_Union[StageDecision, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[CheckedImage, _Mapping]]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("json", "request_id")
    JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    json: str
    request_id: str
    def __init__(self, json: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ChatChunk(_message.Message):
    __slots__ = ("json", "decision")
    JSON_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    json: str
    decision: str
    def __init__(self, json: _Optional[str] = ..., decision: _Optional[str] = ...) -> None: ...

class PurifyRequest(_message.Message):
    __slots__ = ("images", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PurifiedImage(_message.Message):
    __slots__ = ("index", "png", "digest", "steps", "similarity")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    png: bytes
    digest: str
    steps: int
    similarity: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., png: _Optional[bytes] = ..., digest: _Optional[str] = ..., steps: _Optional[int] = ..., similarity: _Optional[_Iterable[float]] = ...) -> None: ...

class PurifyResponse(_message.Message):
    __slots__ = ("request_id", "images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[PurifiedImage]
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[PurifiedImage, _Mapping]]] = ...) -> None: ...
