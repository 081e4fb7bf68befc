import pytest
from pydantic import ValidationError

from cluster.protocol.wire import (
    ChatTemplateDatasetType,
    DpoDatasetType,
    GrpoDatasetType,
    InstructTextDatasetType,
    TaskType,
    TrainRequestText,
    parse_dataset_type,
    task_type_of,
)

INSTRUCT = {"system_prompt": "", "system_format": "{system}", "field_system": None, "field_instruction": "instruct",
            "field_input": "input", "field_output": "output", "format": None, "no_input_format": None, "field": None}


@pytest.mark.parametrize("raw,cls,task", [
    (INSTRUCT, InstructTextDatasetType, TaskType.INSTRUCTTEXTTASK),
    ({"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"}, DpoDatasetType, TaskType.DPOTASK),
    ({"field_prompt": "prompt", "reward_functions": []}, GrpoDatasetType, TaskType.GRPOTASK),
    ({"chat_template": "chatml", "chat_column": "conversations"}, ChatTemplateDatasetType, TaskType.CHATTASK),
])
def test_dataset_type_is_discriminated_by_keys(raw, cls, task):
    parsed = parse_dataset_type(raw)
    assert type(parsed) is cls
    assert task_type_of(parsed) is task


def test_ambiguous_dataset_type_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="cannot tell the dataset type"):
        parse_dataset_type({"system_prompt": ""})


def test_train_request_accepts_int_and_float_hours_and_rejects_empty_dataset():
    base = {"model": "org/m", "task_id": "t", "dataset": "http://x", "dataset_type": INSTRUCT, "file_format": "s3"}
    assert TrainRequestText(**base, hours_to_complete=3).hours_to_complete == 3.0
    assert TrainRequestText(**base, hours_to_complete=0.5).hours_to_complete == 0.5
    with pytest.raises(ValidationError):
        TrainRequestText(**{**base, "dataset": ""}, hours_to_complete=1)
    with pytest.raises(ValidationError):
        TrainRequestText(**base, hours_to_complete=0)
