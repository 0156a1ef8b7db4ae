"""What the HTTP API answers, declared: the models behind /openapi.json and every response."""

from typing import Any

from pydantic import BaseModel

__all__ = [
    "BatchingInfo", "EnsembleInfo", "ErrorResponse", "ExplainResponse", "HealthResponse", "ImageAnswer",
    "ImageExplanation", "ImageTiming", "LimitsInfo", "MemberInfo", "MetadataResponse", "PredictResponse",
    "StatsResponse",
]  # fmt: skip


class ImageTiming(BaseModel):
    decode_ms: float
    queue_ms: float
    forward_ms: float
    batch_size: int


class ImageAnswer(BaseModel):
    name: str
    labels: list[str]
    probabilities: list[float]
    timing: ImageTiming


class PredictResponse(BaseModel):
    model_id: str
    mode: str
    members: list[str]
    predictions: list[ImageAnswer]
    total_ms: float


class ImageExplanation(BaseModel):
    name: str
    labels: list[str]
    probabilities: list[float]
    explained: str  # the class whose evidence the overlay shows: the top one
    overlay_png: str  # base64 PNG: the image with its Grad-CAM heatmap drawn over it


class ExplainResponse(BaseModel):
    model_id: str
    mode: str
    members: list[str]
    explanations: list[ImageExplanation]
    total_ms: float


class HealthResponse(BaseModel):
    status: str
    model_id: str
    auth: bool


class ErrorResponse(BaseModel):
    """Every 4xx answer: what was wrong with the request, in one sentence."""

    detail: str


class MemberInfo(BaseModel):
    member_id: str
    backbone: str
    image_size: int
    preprocessing: dict[str, Any]
    temperature: float
    weight: float
    val_metrics: dict[str, Any]
    serving: bool
    latency_ms: dict[str, float] = {}  # forward ms by batch size, measured where the artifact was built
    replica_latency_ms: dict[str, float] | None = None  # the same, measured by the replica when it started


class EnsembleInfo(BaseModel):
    method: str | None
    weights: list[float]
    temperature: float


class LimitsInfo(BaseModel):
    max_body_bytes: int
    max_pixels: int
    max_images_per_request: int


class BatchingInfo(BaseModel):
    max_batch_size: int
    batch_wait_timeout_s: float


class MetadataResponse(BaseModel):
    model_id: str
    mode: str
    layout: str
    ingress: str
    class_names: list[str]
    members: list[MemberInfo]
    ensemble: EnsembleInfo
    calibration_temperature: float
    cascade: dict[str, Any] | None = None  # mode cascade: the cheap member and its confidence threshold
    metrics: dict[str, Any]
    versions: dict[str, Any]
    limits: LimitsInfo
    batching: BatchingInfo


class StatsResponse(BaseModel):
    ingress: dict[str, Any]
    members: dict[str, dict[str, Any]] | None = None  # the composed layout's member replicas
