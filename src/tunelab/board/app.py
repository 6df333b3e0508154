"""`tunelab board`: one FastAPI app over the run folders, and one static page (static/).

Every view reads what the stages already write or computes it with their own code:
run status and curves (board/runs.py over trainer_log.jsonl), comparisons (board/compare.py with
evaluate/report.py's diagnosis), evaluation examples (eval/predictions.jsonl, task_eval/step-N.jsonl),
the data preview (train/dataset.py's reading and encoding, data/templates.mark_trained), the
memory estimate (serve/estimate.py), chat (serve/engine.py, as `tunelab chat`), and launching
(`tunelab train` in a child process after config.load_config's checks).

Security: bound to 127.0.0.1 by default; with a token, every /api call must carry it
(`Authorization: Bearer T`, or `?token=T`); POSTs must be JSON (a web page elsewhere cannot send
one without a CORS preflight, which this app never answers), and Host must be an allowed name
(no DNS rebinding onto the loopback server).
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel

from tunelab.board import runs as R
from tunelab.board.launch import error_text, log_tail, start_train
from tunelab.errors import TunelabError
from tunelab.io import write_json_atomic, write_text_atomic

STATIC = Path(__file__).parent / "static"
CURVE_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second")
MAX_EXAMPLES = 50


class ConfigText(BaseModel):
    text: str  # YAML, or `path/to/config.yaml` on the first line and key=value lines after it
    index: int = 0  # data preview: which training sample


class ChatRequest(BaseModel):
    run: str
    messages: list[dict]
    max_new_tokens: int = 64
    temperature: float = 0.0


class Board:
    """The state the routes share: the runs folder, the processes launched, the loaded chat engine."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.state_dir = self.runs_dir / ".board"
        self.processes: dict[str, object] = {}  # run path -> Popen (reaped here, so their status is known)
        self.engine = None
        self.engine_run: str | None = None
        self.engine_lock = threading.Lock()

    # --- runs -----------------------------------------------------------------------------

    def launches(self) -> dict[Path, R.Launch]:
        path = self.state_dir / "launches.json"
        records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        ended = False
        for record in records:
            process = self.processes.get(record["run_dir"])
            if process is not None and record.get("returncode") is None and process.poll() is not None:
                record["returncode"], ended = process.returncode, True
        if ended:  # kept, so a restarted board still knows how its runs ended
            write_json_atomic(path, records)
        return {Path(r["run_dir"]).resolve(): R.Launch(r.get("pid"), r.get("returncode"), r.get("log"))
                for r in records}

    def record_launch(self, run_dir: Path, pid: int, log: Path, config: Path) -> None:
        path = self.state_dir / "launches.json"
        records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        records = [r for r in records if r["run_dir"] != str(run_dir)]
        records.append({"run_dir": str(run_dir), "pid": pid, "returncode": None, "log": str(log),
                        "config": str(config), "started": time.time()})
        write_json_atomic(path, records)

    def runs(self) -> list[R.RunInfo]:
        launches = self.launches()
        found = R.find_runs(self.runs_dir, launches)
        seen = {r.path.resolve() for r in found}
        root = self.runs_dir.resolve()
        for path, launch in launches.items():  # not started yet, failed early, or outside runs_dir
            if path not in seen:
                name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
                found.append(R.run_info(path, name, launch))
        for info in found:
            launch = launches.get(info.path.resolve())
            if info.status == "failed" and launch and launch.log:
                info.final["error"] = error_text(Path(launch.log)) or log_tail(Path(launch.log), 5)
        return found

    def run(self, run_id: str) -> R.RunInfo:
        for info in self.runs():
            if info.name == run_id:
                return info
        raise TunelabError(f"no run {run_id!r} under {self.runs_dir}", where="run", fix="pick a run from the list")

    # --- chat -----------------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> dict:
        from tunelab.data.types import Message
        from tunelab.model.generate import GenerationOptions
        from tunelab.serve.chat import fit_history

        messages = [Message(m.get("role", "user"), str(m.get("content", ""))) for m in request.messages]
        if not messages or messages[-1].role != "user":
            raise TunelabError("the chat needs a user message last", where="messages", fix="type a message")
        system = messages[0].content if messages[0].role == "system" else None
        history = messages[1:] if system is not None else messages
        options = GenerationOptions(max_new_tokens=max(1, min(request.max_new_tokens, 1024)),
                                    temperature=request.temperature)
        with self.engine_lock:  # one model in memory, one generation at a time (serve/engine.py)
            engine = self._engine_for(request.run)
            prompt, _ = fit_history(engine, system, history, options.max_new_tokens)
            if prompt is None:
                raise TunelabError("the message leaves no room for a reply in the model's context",
                                   where="messages", fix="send a shorter message")
            started = time.perf_counter()
            [generation] = engine.generate(prompt, options, adapter=next(iter(engine.adapters), None))
        return {"reply": generation.text, "model": request.run, "seconds": round(time.perf_counter() - started, 2)}

    def _engine_for(self, run_id: str):
        """The run's model as `tunelab chat --model BASE --adapter RUN` loads it (trained template included)."""
        if self.engine_run == run_id:
            return self.engine
        from argparse import Namespace

        from tunelab.serve.cli import engine_from_args

        info = self.run(run_id)
        if info.status != "finished":
            raise TunelabError(f"run {run_id} is {info.status}: it has no final weights yet", where="run",
                               fix="chat with a finished run")
        config = R.read_config(info.path)
        adapter = (info.path / "adapter_model.safetensors").is_file()
        args = Namespace(model=str(config.get("model_name_or_path")) if adapter else str(info.path), template=None,
                         force_template=False, quantization_bit=None, device="auto", dtype="auto",
                         context_length=None)
        self.engine = None  # free the previous model before loading the next
        self.engine = engine_from_args(args, {run_id: info.path} if adapter else {})
        self.engine_run = run_id
        return self.engine

    # --- configs: check, preview, estimate, launch ----------------------------------------

    def load(self, text: str):
        """The config the form describes, through `tunelab train`'s own checks."""
        from tunelab.config import load_config

        config, overrides = parse_form(text)
        if config is None:
            return None, load_config(None, overrides)
        return config, load_config(config, overrides)

    def launch(self, text: str) -> dict:
        config_path, cfg = self.load(text)
        run_dir = Path(cfg.output_dir)
        if run_dir.resolve() in {p for p, launch in self.launches().items() if launch.alive()}:
            raise TunelabError(f"a run is already training into {run_dir}", where="output_dir",
                               fix="pick another output_dir")
        if R.is_run(run_dir) and not cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
            raise TunelabError(f"output_dir {run_dir} already holds a run", where="output_dir",
                               fix="pick another output_dir, or add overwrite_output_dir=true")
        name = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        form = self.state_dir / "configs" / f"{name}.txt"
        write_text_atomic(form, text)
        _, overrides = parse_form(text)
        if config_path is None:  # YAML typed into the form: a file `tunelab train` reads
            yaml_file = self.state_dir / "configs" / f"{name}.yaml"
            write_text_atomic(yaml_file, text)
            config_path, overrides = str(yaml_file), []
        log = self.state_dir / "logs" / f"{name}.log"
        process = start_train(config_path, overrides, log)
        self.processes[str(run_dir)] = process
        self.record_launch(run_dir, process.pid, log, form)
        return {"run_dir": str(run_dir), "pid": process.pid, "log": str(log)}


def parse_form(text: str) -> tuple[str | None, list[str] | dict]:
    """`path.yaml` + key=value lines -> (path, overrides); YAML text -> (None, its mapping)."""
    import yaml

    from tunelab.config import _load_yaml

    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise TunelabError("the config is empty", where="launch form",
                           fix="write YAML (key: value lines) or a config path and key=value lines")
    path = lines[0] if lines[0].endswith((".yaml", ".yml")) and ":" not in lines[0] else None
    rest = lines[1:] if path else lines
    if all("=" in ln and ":" not in ln.split("=", 1)[0] for ln in rest):
        return path, rest
    if path:
        raise TunelabError("after the config path, write key=value lines", where="launch form",
                           fix="e.g. examples/quickstart.yaml then learning_rate=1e-4 on the next line")
    try:
        values = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise TunelabError(f"not valid YAML ({exc})", where="launch form", fix="check the indentation and quoting") from None
    if not isinstance(values, dict):
        raise TunelabError("the config must be key: value lines", where="launch form", fix="write one key: value a line")
    return None, values


def preview(cfg, index: int) -> dict:
    """One training sample as training renders it: [{text, trained}] pieces (labels != -100 trained)."""
    from tunelab.data.templates import lock_template, mark_trained
    from tunelab.model.loader import load_tokenizer
    from tunelab.train.dataset import encode_samples, read_conversations

    train, _, _ = read_conversations(cfg)
    if not train:
        raise TunelabError("the data set has no training records", where=", ".join(cfg.dataset), fix="check the data")
    index = max(0, min(index, len(train) - 1))
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    template = None if cfg.stage == "pt" else lock_template(tokenizer, cfg.template, cfg.system_prompt)
    [sample], _ = encode_samples([train[index]], tokenizer, template, cfg)
    # mark_trained with control characters as marks, split back into pieces for the page.
    marked = mark_trained(sample.input_ids, sample.labels, tokenizer, open_mark="\x02", close_mark="\x03")
    pieces = []
    for chunk in marked.split("\x02"):
        trained, _, rest = chunk.partition("\x03") if "\x03" in chunk else ("", "", chunk)
        if trained:
            pieces.append({"text": trained, "trained": True})
        if rest:
            pieces.append({"text": rest, "trained": False})
    n_trained = sum(label != -100 for label in sample.labels)
    return {"index": index, "records": len(train), "source": train[index].source, "tokens": len(sample.input_ids),
            "trained_tokens": n_trained, "pieces": pieces}


def estimate(cfg, runs: list[R.RunInfo]) -> dict:
    """serve/estimate.py's GPU memory for this config, and a time per step from an earlier run like it."""
    from tunelab.serve.estimate import OPTIMIZERS, Settings, estimate_memory, format_estimate, load_architecture

    method = {"lora": "qlora" if cfg.quantization_bit == 4 else "lora"}.get(cfg.finetuning_type, "full")
    settings = Settings(method=method, seq_len=cfg.cutoff_len, batch=cfg.per_device_train_batch_size,
                        dtype="fp16" if cfg.fp16 else "fp32" if cfg.bf16 is False else "bf16",
                        optimizer=cfg.optim if cfg.optim in OPTIMIZERS else "adamw",
                        gradient_checkpointing=bool(cfg.gradient_checkpointing), lora_rank=cfg.lora_rank,
                        lora_target=list(cfg.lora_target), padded=not (cfg.packing or cfg.padding_free),
                        activation_offload=cfg.activation_offload == "true", tiled_mlp=cfg.tiled_mlp == "true",
                        fused_loss=bool(cfg.fused_loss))
    est = estimate_memory(load_architecture(cfg.model_name_or_path), settings)
    notes = [] if cfg.finetuning_type != "freeze" else ["freeze is estimated as full fine-tuning (an upper bound)"]
    return {"gib": round(est.total / 2**30, 2), "text": format_estimate(est), "notes": notes,
            "time": time_estimate(cfg, runs)}


def time_estimate(cfg, runs: list[R.RunInfo]) -> str:
    """Wall time per step (evaluations and saves included) of the newest finished run with the same
    model, batch, accumulation, cutoff_len and device, times this config's max_steps."""
    same = ("model_name_or_path", "per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "device")
    wanted = {k: getattr(cfg, k) for k in same}
    for info in runs:
        config = R.read_config(info.path)
        if info.status != "finished" or not info.step or any(config.get(k) != v for k, v in wanted.items()):
            continue
        seconds = (info.path / "trainer_log.jsonl").stat().st_mtime - (info.path / "config.yaml").stat().st_mtime
        per_step = seconds / info.step
        if cfg.max_steps > 0:
            return (f"about {per_step * cfg.max_steps / 60:.1f} min for {cfg.max_steps} steps ({per_step:.1f} s a "
                    f"step in run {info.name}, same model, batch and device)")
        return f"{per_step:.1f} s a step in run {info.name} (same model, batch and device)"
    return "no finished run with the same model, batch, cutoff_len and device to time it from"


def curves(info: R.RunInfo) -> dict:
    rows = R.read_rows(info.path)
    train = [{k: r[k] for k in ("step", *CURVE_KEYS) if k in r} for r in rows if "loss" in r]
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in rows
             if any(k.startswith("eval_") for k in r)]
    return {"run": info.name, "status": info.status, "step": info.step, "max_steps": info.max_steps,
            "train": train, "eval": evals}


def compare(board: Board, names: list[str], metric: str) -> dict:
    from tunelab.board.compare import summarize_runs
    from tunelab.evaluate.report import find_log

    infos = [board.run(n) for n in names]
    configs = {i.name: R.read_config(i.path) for i in infos}
    with_log = [i for i in infos if (i.path / "trainer_log.jsonl").is_file()]
    findings = {}
    for info in with_log:
        try:
            find_log(info.path)
            [summary] = summarize_runs([info.path], metric)
            findings[info.name] = [{"severity": f.severity, "title": f.title, "detail": f.detail}
                                   for f in summary.findings]
        except TunelabError as exc:  # a run that has not logged a row yet
            findings[info.name] = [{"severity": "info", "title": "no curves yet", "detail": exc.what}]
    metrics = {i.name: {"final": i.final, "best": R.best_value(R.read_rows(i.path), metric)} for i in infos}
    return {"metric": metric, "lower_is_better": R.lower_is_better(metric), "config_diff": R.config_diff(configs),
            "metrics": metrics, "findings": findings}


def examples(info: R.RunInfo) -> dict:
    found = R.predictions(info.path)
    if found is None:
        return {"run": info.name, "where": None, "rows": []}
    where, rows = found
    keep = ("prompt", "reference", "prediction", "scores")
    return {"run": info.name, "where": where, "rows": [{k: r.get(k) for k in keep} for r in rows[:MAX_EXAMPLES]]}


# --- the app --------------------------------------------------------------------------

def create_app(runs_dir: Path, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    board = Board(runs_dir)
    app = FastAPI(title="tunelab board", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.board = board

    def authorized(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
            request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid token is required (Authorization: Bearer T, or ?token=T)")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]")
        if allowed_hosts is not None and host not in allowed_hosts:
            return JSONResponse({"error": f"host {host!r} is not allowed"}, status_code=400)
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"error": "POST bodies must be JSON"}, status_code=415)
        return await call_next(request)

    @app.exception_handler(TunelabError)
    async def user_error(request: Request, exc: TunelabError):
        return JSONResponse({"error": exc.message()}, status_code=400)

    api = [Depends(authorized)]

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if path.parent != STATIC or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path)

    @app.get("/api/runs", dependencies=api)
    def list_runs():
        infos = board.runs()
        sweeps = {}
        for info in infos:
            if info.sweep:
                sweeps.setdefault(info.sweep, []).append(info.name)
        return {"runs_dir": str(board.runs_dir.resolve()), "runs": [i.to_json() for i in infos], "sweeps": sweeps}

    @app.get("/api/curves", dependencies=api)
    def get_curves(run: Annotated[list[str], Query()]):
        return {"runs": [curves(board.run(name)) for name in run]}

    @app.get("/api/compare", dependencies=api)
    def get_compare(run: Annotated[list[str], Query()], metric: str = "eval_loss"):
        return compare(board, run, metric)

    @app.get("/api/examples", dependencies=api)
    def get_examples(run: str):
        return examples(board.run(run))

    @app.get("/api/config", dependencies=api)
    def get_config(run: str):
        path = board.run(run).path / "config.yaml"
        return {"text": path.read_text(encoding="utf-8") if path.is_file() else ""}

    @app.get("/api/log", dependencies=api)
    def get_log(run: str):
        launch = board.launches().get(board.run(run).path.resolve())
        return {"text": log_tail(Path(launch.log), 40) if launch and launch.log else ""}

    @app.post("/api/check", dependencies=api)
    def check(body: ConfigText):
        _, cfg = board.load(body.text)
        return {"ok": True, "output_dir": cfg.output_dir, "model": cfg.model_name_or_path, "stage": cfg.stage,
                "finetuning_type": cfg.finetuning_type}

    @app.post("/api/preview", dependencies=api)
    def post_preview(body: ConfigText):
        return preview(board.load(body.text)[1], body.index)

    @app.post("/api/estimate", dependencies=api)
    def post_estimate(body: ConfigText):
        return estimate(board.load(body.text)[1], board.runs())

    @app.post("/api/launch", dependencies=api)
    def post_launch(body: ConfigText):
        return board.launch(body.text)

    @app.post("/api/chat", dependencies=api)
    def post_chat(body: ChatRequest):
        return board.chat(body)

    return app
