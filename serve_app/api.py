"""The miner's HTTP API: G.O.D's offer-era endpoints (exact paths, trailing slashes) and the
tournament endpoint. Routes live on the module-level `api` so they are testable without Serve;
the control plane and authenticator are attached with `wiring.install()`."""
from __future__ import annotations

from fastapi import Depends, FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cluster.control import ControlPlane, Refused
from cluster.protocol.wire import (
    MinerSubmission,
    MinerTaskOffer,
    MinerTaskResponse,
    TaskType,
    TournamentType,
    TrainingRepoResponse,
    TrainRequestImage,
    TrainRequestText,
    TrainResponse,
)

from .auth import SignedRequests
from .wiring import control_plane

api = FastAPI(title="Gradients miner", version="0.1.0")
# Every route but /healthz and the docs is signed by a staked validator (fiber's
# blacklist_low_stake + verify_request, in that order), checked before any parsing.
api.add_middleware(SignedRequests)


@api.exception_handler(RequestValidationError)
async def short_validation_errors(request, exc: RequestValidationError) -> JSONResponse:
    """422 with a short reason. FastAPI's default echoes the input back, which may not even be
    serialisable (a huge or non-finite number) and would turn a bad request into a 500."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5])
    return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}"[:1000]})

TEXT_TRAINING_TYPES = {TaskType.INSTRUCTTEXTTASK, TaskType.DPOTASK, TaskType.CHATTASK}


def _train(control: ControlPlane, req: TrainRequestText, types: set[TaskType]) -> TrainResponse:
    try:
        return control.start_training(req, types)
    except Refused as exc:
        raise HTTPException(exc.status, exc.reason)


@api.post("/task_offer/", response_model=MinerTaskResponse)
async def task_offer(offer: MinerTaskOffer,
                     control: ControlPlane = Depends(control_plane)) -> MinerTaskResponse:
    # Answered in memory (~0.4 ms): on the event loop, without the thread-pool hop a sync route
    # pays. Only a model seen for the first time may wait on its lookup (<= 1 s): off the loop.
    if control.models.answers_now(offer.model):
        return control.offer(offer)
    return await run_in_threadpool(control.offer, offer)


@api.post("/task_offer_image/", response_model=MinerTaskResponse)
def task_offer_image(offer: MinerTaskOffer) -> MinerTaskResponse:
    return MinerTaskResponse(message="declined: this miner does not train image models yet", accepted=False)


@api.post("/start_training/", response_model=TrainResponse)
def start_training(req: TrainRequestText,
                   control: ControlPlane = Depends(control_plane)) -> TrainResponse:
    return _train(control, req, TEXT_TRAINING_TYPES)


@api.post("/start_training_grpo/", response_model=TrainResponse)
def start_training_grpo(req: TrainRequestText,
                        control: ControlPlane = Depends(control_plane)) -> TrainResponse:
    return _train(control, req, {TaskType.GRPOTASK})


@api.post("/start_training_image/", response_model=TrainResponse)
def start_training_image(req: TrainRequestImage) -> TrainResponse:
    raise HTTPException(422, "this miner does not train image models; the offer was declined")


@api.get("/get_latest_model_submission/{task_id}", response_model=MinerSubmission)
def get_latest_model_submission(task_id: str,
                                control: ControlPlane = Depends(control_plane)) -> MinerSubmission:
    submission = control.submission(task_id)
    if submission is None:
        raise HTTPException(404, f"no published submission for task {task_id}")
    return submission


@api.get("/training_repo/{task_type}", response_model=TrainingRepoResponse, response_model_exclude_none=True)
def training_repo(task_type: TournamentType,
                  control: ControlPlane = Depends(control_plane)) -> TrainingRepoResponse:
    """The one route of the tournament era. Only text: we have no image or environment trainer,
    and an answer would enrol us (and charge the entry fee) for a tournament we cannot run."""
    if task_type != TournamentType.TEXT:
        raise HTTPException(404, f"this miner has no {task_type.value} trainer; it enters text tournaments only")
    s = control.settings
    problem = s.training_repo_problem()
    if problem:
        raise HTTPException(503, problem)
    return TrainingRepoResponse(github_repo=s.training_repo, commit_hash=s.training_commit,
                                github_token=s.training_github_token)


@api.get("/healthz")
def healthz() -> dict:
    return {"ok": True}
