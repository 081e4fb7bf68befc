"""Wire formats of the Gradients (G.O.D) miner API, with G.O.D's field names and defaults.

Reference: G.O.D commit 09cfbeae, `core/models/payload_models.py` and `utility_models.py`
(see ../shared/docs/gradients-protocol.md §3). These models are shared by the Serve ingress
(which parses them) and the validator simulator (which sends them).
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Union
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class TaskType(str, Enum):
    INSTRUCTTEXTTASK = "InstructTextTask"
    IMAGETASK = "ImageTask"
    DPOTASK = "DpoTask"
    GRPOTASK = "GrpoTask"
    CHATTASK = "ChatTask"


class FileFormat(str, Enum):
    CSV = "csv"
    JSON = "json"
    HF = "hf"
    S3 = "s3"


class ImageModelType(str, Enum):
    FLUX = "flux"
    SDXL = "sdxl"


class InstructTextDatasetType(BaseModel):
    system_prompt: str | None = ""
    system_format: str | None = "{system}"
    field_system: str | None = None
    field_instruction: str | None = None
    field_input: str | None = None
    field_output: str | None = None
    format: str | None = None
    no_input_format: str | None = None
    field: str | None = None


class DpoDatasetType(BaseModel):
    field_prompt: str | None = None
    field_system: str | None = None
    field_chosen: str | None = None
    field_rejected: str | None = None
    prompt_format: str | None = "{prompt}"
    chosen_format: str | None = "{chosen}"
    rejected_format: str | None = "{rejected}"


class RewardFunction(BaseModel):
    reward_func: str
    reward_weight: float = Field(ge=0)
    func_hash: str | None = None
    is_generic: bool | None = None
    reward_id: str | None = None
    is_manual: bool | None = None


class GrpoDatasetType(BaseModel):
    field_prompt: str | None = None
    reward_functions: list[RewardFunction] | None = []
    extra_column: str | None = None


class ChatTemplateDatasetType(BaseModel):
    chat_template: str | None = "chatml"
    chat_column: str | None = "conversations"
    chat_role_field: str | None = "from"
    chat_content_field: str | None = "value"
    chat_user_reference: str | None = "user"
    chat_assistant_reference: str | None = "assistant"


TextDatasetType = Union[InstructTextDatasetType, DpoDatasetType, GrpoDatasetType, ChatTemplateDatasetType]


def parse_dataset_type(raw: Any) -> TextDatasetType:
    """Discriminate the dataset-type union explicitly, by key, as the validator's
    `EvaluationArgs.parse_dataset_type` does. Every field of every variant is optional,
    so pydantic's smart-union guess is not trustworthy (protocol doc §3.2)."""
    if isinstance(raw, BaseModel):
        return raw  # type: ignore[return-value]
    if not isinstance(raw, dict):
        raise ValueError("dataset_type must be a JSON object")
    keys = set(raw)
    if "reward_functions" in keys:
        return GrpoDatasetType.model_validate(raw)
    if "field_chosen" in keys or "field_rejected" in keys:
        return DpoDatasetType.model_validate(raw)
    if "chat_template" in keys or "chat_column" in keys:
        return ChatTemplateDatasetType.model_validate(raw)
    if "field_instruction" in keys or "field_input" in keys or "field_output" in keys:
        return InstructTextDatasetType.model_validate(raw)
    raise ValueError(
        "cannot tell the dataset type: expected field_instruction (Instruct), field_chosen (DPO), "
        "reward_functions (GRPO) or chat_template/chat_column (Chat)"
    )


def task_type_of(dataset_type: TextDatasetType) -> TaskType:
    return {
        InstructTextDatasetType: TaskType.INSTRUCTTEXTTASK,
        DpoDatasetType: TaskType.DPOTASK,
        GrpoDatasetType: TaskType.GRPOTASK,
        ChatTemplateDatasetType: TaskType.CHATTASK,
    }[type(dataset_type)]


class MinerTaskOffer(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    ds_size: int | None = None
    model: str
    hours_to_complete: float
    task_id: str
    task_type: TaskType
    model_params_count: int | None = None


class MinerTaskResponse(BaseModel):
    message: str
    accepted: bool


class TrainRequest(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str = Field(min_length=1)
    task_id: str = Field(min_length=1)
    # int at 09cfbeae, float from 5.0 on: accept both.
    hours_to_complete: float = Field(gt=0)
    expected_repo_name: str | None = None


class TrainRequestText(TrainRequest):
    dataset: str = Field(min_length=1)
    dataset_type: Any
    file_format: FileFormat

    def parsed_dataset_type(self) -> TextDatasetType:
        return parse_dataset_type(self.dataset_type)


class TrainRequestImage(TrainRequest):
    dataset_zip: str = Field(min_length=1)
    model_type: ImageModelType = ImageModelType.SDXL


class TrainResponse(BaseModel):
    message: str
    task_id: UUID


class MinerSubmission(BaseModel):
    repo: str
    model_hash: str | None = None


class TrainingRepoResponse(BaseModel):
    """G.O.D core/models/payload_models.py; the validator refuses a commit_hash that is not 40 hex."""
    github_repo: str
    commit_hash: str
    github_token: str | None = None              # only for a private repository
    requested_datasets: list[str] | None = None  # whitelisted HF datasets to find under MINER_DATASETS_DIR


class TournamentType(str, Enum):
    TEXT = "text"
    IMAGE = "image"
    ENVIRONMENT = "environment"
