"""Shared helpers of the fault-injection tests."""
import json
import time
import uuid

from cluster.state.store import Job

INSTRUCT = {"field_instruction": "instruct", "field_input": "input", "field_output": "output",
            "system_prompt": "", "system_format": "{system}"}


def good_rows(n=40):
    return [{"instruct": f"Unscramble word {i}", "input": f"l{i}e{i}", "output": f"word{i}"} for i in range(n)]


def make_job(model="m", url="http://x/d.json", minutes=10.0, dataset_type=None, **kw) -> Job:
    now = time.time()
    return Job(task_id=str(uuid.uuid4()), task_type="InstructTextTask", model=str(model), dataset_url=url,
               dataset_type=dataset_type or INSTRUCT, file_format="s3", expected_repo_name=str(uuid.uuid4()),
               hours_to_complete=minutes / 60, created_at=now, deadline=now + minutes * 60, **kw)


def dumps(rows) -> bytes:
    return json.dumps(rows).encode()
