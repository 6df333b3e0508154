"""`tunelab report RUN_DIR`: draw the training curves and read them as a practitioner would.

Input: `RUN_DIR/trainer_log.jsonl` written by the training loop, one JSON object per line,
either a training row {step, epoch, loss, learning_rate, grad_norm, tokens_per_second} or an
evaluation row {step, epoch, eval_loss, eval_perplexity}; any key may be missing, a line cut
short by a crash is skipped, and after a resume the last row logged for a step wins.

Output (default `RUN_DIR/report/`): loss.png, perplexity.png, learning_rate.png, report.md,
report.json; and `Finding`s, each citing the numbers it rests on. The thresholds below are
deliberately conservative: a report that cries wolf on every run gets ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunelab.config import TOKEN_STAGES
from tunelab.errors import TunelabError
from tunelab.io import write_json_atomic, write_text_atomic
from tunelab.train.runlog import LOG_NAME, draw_loss, ema, new_figure, perplexity, read_log, save_figure, window_size

# Not converged: over the last TAIL_FRACTION of logged steps, a straight line fitted to the
# loss falls by more than STILL_FALLING_REL of its value, or by more than TAIL_SHARE of the
# whole run's improvement (a loss falling at an even pace has not flattened, however slowly
# it falls); always by STILL_FALLING_ABS nats at least (a loss near 0 can't trigger it) and
# with a slope TREND_T standard errors below 0 (noise alone can't trigger it either).
# A converged run's last fifth brings a few % of its value and ~1-3 % of its improvement.
TAIL_FRACTION = 0.2
STILL_FALLING_REL = 0.05
TAIL_SHARE = 0.10
STILL_FALLING_ABS = 0.02
TREND_T = 3.0
# Over-fitting: the last eval loss is more than OVERFIT_RISE above the best one (eval loss is
# computed on a fixed set, so a 2 % rise is signal) while the train loss kept falling.
OVERFIT_RISE = 0.02
# Memorising: the smoothed train loss is below MEMORIZE_LOSS (perplexity < 1.05: the model
# predicts nearly every target token with certainty) within the first MEMORIZE_EARLY of steps.
MEMORIZE_LOSS = 0.05
MEMORIZE_EARLY = 0.5
# Spikes: a loss more than SPIKE_RATIO times the median of the preceding window and, in log
# space, more than SPIKE_SIGMAS robust standard deviations of the run's own step-to-step noise
# (6 sigma: ~never reached by noise even over thousands of steps). Divergence: the loss ends
# more than DIVERGE_RATIO above where it started, or becomes NaN/inf.
SPIKE_RATIO = 1.5
SPIKE_SIGMAS = 6.0
DIVERGE_RATIO = 1.1
MIN_POINTS = 10  # fewer logged losses than this: no trend can be read

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    code: str  # diverged | loss_spikes | overfitting | memorizing | not_converged | healthy | ...
    severity: str  # critical | warning | info
    title: str
    detail: str  # the numbers the finding rests on
    advice: str
    evidence: dict = field(default_factory=dict)


@dataclass
class Curves:
    steps: np.ndarray
    epochs: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    grad_norm: np.ndarray
    tokens_per_second: np.ndarray
    eval_steps: np.ndarray
    eval_epochs: np.ndarray
    eval_loss: np.ndarray
    eval_ppl: np.ndarray
    skipped_lines: int = 0
    # Other evaluation metrics by name (task metrics such as eval_slot_f1, preference
    # accuracies), on eval_steps.
    eval_metrics: dict[str, np.ndarray] = field(default_factory=dict)
    # Online RL's training-row metrics (stage grpo / ppo) by name, on steps.
    train_metrics: dict[str, np.ndarray] = field(default_factory=dict)


# What grpo / ppo log on their training rows (train/objectives/rl.py, train/step.py).
ONLINE_METRICS = ("reward", "reward_std", "kl", "clip_fraction", "completion_length", "value_loss",
                  "samples_per_second", "generation_share")


@dataclass
class ReportResult:
    run_dir: Path
    out_dir: Path
    findings: list[Finding]
    plots: list[Path]
    summary: dict
    eval_metrics: dict = field(default_factory=dict)  # name -> first / best / best_step / last

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity != "info"]


# --- reading the log -----------------------------------------------------------------

def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def find_log(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    log = run_dir / LOG_NAME
    if log.is_file():
        return log
    if not run_dir.is_dir():
        raise TunelabError(f"run folder {run_dir} does not exist", where="command line",
                           fix="give the output_dir of a `tunelab train` run")
    if (run_dir.parent / LOG_NAME).is_file():  # a checkpoint folder was given
        fix = f"use the run folder itself: tunelab report {run_dir.parent}"
    else:
        fix = "give the output_dir of a `tunelab train` run (report_to must include jsonl)"
    raise TunelabError(f"no {LOG_NAME} in {run_dir}", where=str(run_dir), fix=fix)


def read_curves(log: Path) -> Curves:
    """Train and eval series from the log, sorted by step, the last row per step kept."""
    train: dict[float, dict] = {}
    evals: dict[float, dict] = {}
    rows = read_log(log)
    last_step = 0.0
    for row in rows:
        is_eval = "eval_loss" in row or "eval_perplexity" in row
        if not is_eval and "loss" not in row:
            continue  # e.g. a final summary row (train_runtime, ...)
        step = _float(row.get("step"))
        if math.isnan(step):  # no step logged: a train row is the next step, an eval row is at this one
            step = last_step if is_eval else last_step + 1
        last_step = step
        (evals if is_eval else train)[step] = row
    if not train and not evals:
        raise TunelabError(f"{log} has no training or evaluation rows yet", where=str(log),
                           fix="wait for the first logging_steps of training, or check that this is the right run")

    def column(rows: dict[float, dict], key: str) -> np.ndarray:
        return np.array([_float(rows[s].get(key)) for s in sorted(rows)], dtype=float)

    eval_loss = column(evals, "eval_loss")
    names = dict.fromkeys(k for r in evals.values() for k in r
                          if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity"))
    eval_ppl = column(evals, "eval_perplexity")
    if _loss_is_token_cross_entropy(log.parent):  # rows that logged only eval_loss (e.g. a Trainer's log)
        eval_ppl = np.where(np.isnan(eval_ppl), np.array([perplexity(v) for v in eval_loss]), eval_ppl)
    return Curves(
        steps=np.array(sorted(train), dtype=float), epochs=column(train, "epoch"), loss=column(train, "loss"),
        lr=column(train, "learning_rate"), grad_norm=column(train, "grad_norm"),
        tokens_per_second=column(train, "tokens_per_second"),
        eval_steps=np.array(sorted(evals), dtype=float), eval_epochs=column(evals, "epoch"),
        eval_loss=eval_loss, eval_ppl=eval_ppl, skipped_lines=rows.skipped,
        eval_metrics={name: column(evals, name) for name in names},
        train_metrics={name: column(train, name) for name in ONLINE_METRICS
                       if any(name in r for r in train.values())})


def _loss_is_token_cross_entropy(run_dir: Path) -> bool:
    """False for a tunelab run whose eval_loss is not a per-token cross-entropy (preference, reward
    model, RL stages: exp() of a DPO loss or of a negative reward is no perplexity)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return True
    import yaml

    try:
        stage = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("stage", "sft")
    except (yaml.YAMLError, OSError, AttributeError):
        return True
    return stage in TOKEN_STAGES


# --- numeric helpers -----------------------------------------------------------------

def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing median (robust to the odd spike), shorter at the start."""
    return np.array([np.nanmedian(values[max(0, i - window + 1): i + 1]) for i in range(len(values))])


def linear_trend(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, t-statistic of the slope) of a least-squares line."""
    x_mean, y_mean = x.mean(), y.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    slope = float(((x - x_mean) * (y - y_mean)).sum()) / sxx
    intercept = y_mean - slope * x_mean
    residual = y - (slope * x + intercept)
    se = math.sqrt(float((residual ** 2).sum()) / max(len(x) - 2, 1) / sxx)
    t = slope / se if se > 0 else (-math.inf if slope < 0 else math.inf if slope > 0 else 0.0)
    return slope, intercept, t


def _at(values: np.ndarray, steps: np.ndarray, step: float) -> float:
    """The value logged at (or last before) `step`."""
    index = max(int(np.searchsorted(steps, step, side="right")) - 1, 0)
    return float(values[index]) if len(values) else math.nan


def _g(x: float) -> str:
    return f"{x:.4g}"


def _step(step: float) -> str:
    return str(int(step)) if float(step).is_integer() else _g(step)


def _epoch_note(epochs: np.ndarray, index: int) -> str:
    return f" (epoch {epochs[index]:.2f})" if len(epochs) and not math.isnan(epochs[index]) else ""


# --- diagnoses (each: Curves -> list[Finding]) ---------------------------------------

def check_divergence(c: Curves) -> list[Finding]:
    # Only the loss: an inf grad_norm alone is routine under fp16 loss scaling (the step is skipped).
    bad = ~np.isfinite(c.loss)
    if bad.any():
        index = int(np.argmax(bad))
        lr = c.lr[index]
        return [Finding(
            "diverged", "critical", f"Training diverged: the loss became {_g(c.loss[index])}",
            f"first non-finite loss at step {_step(c.steps[index])}{_epoch_note(c.epochs, index)}"
            + (f", learning rate {_g(lr)}" if not math.isnan(lr) else "")
            + f"; {int(bad.sum())} of {len(c.loss)} logged losses are not finite.",
            "lower learning_rate (e.g. by 3-10x), add warmup (warmup_ratio=0.03), keep max_grad_norm=1.0; "
            "with fp16 try bf16 instead.",
            {"step": float(c.steps[index]), "learning_rate": lr, "non_finite": int(bad.sum())})]
    finite = c.loss[np.isfinite(c.loss)]
    if len(finite) < MIN_POINTS:
        return []
    k = max(len(finite) // 10, 1)
    start, end = float(np.median(finite[:k])), float(np.median(finite[-k:]))
    if end > start * DIVERGE_RATIO:
        return [Finding(
            "diverged", "critical", "Training diverged: the loss ended higher than it started",
            f"median loss of the first 10% of logged steps {_g(start)}, of the last 10% {_g(end)} "
            f"(+{100 * (end / start - 1):.1f}%).",
            "lower learning_rate (e.g. by 3-10x) and add warmup (warmup_ratio=0.03).",
            {"start_loss": start, "end_loss": end})]
    return []


def find_spikes(loss: np.ndarray) -> list[tuple[int, float]]:
    """(index, loss / median of the preceding window) of each spike.

    Judged in log space against the run's own step-to-step noise (a robust standard
    deviation of every point's log-ratio to its preceding median), so a run logged every
    step with small batches, noisy by nature, is not read as unstable.
    """
    window = max(5, min(20, len(loss) // 10))
    indices, log_ratios = [], []
    for i in range(window, len(loss)):
        before = loss[i - window:i]
        before = before[np.isfinite(before) & (before > 0)]
        if len(before) >= 3 and math.isfinite(loss[i]) and loss[i] > 0:
            indices.append(i)
            log_ratios.append(math.log(loss[i] / float(np.median(before))))
    if not indices:
        return []
    ratios = np.array(log_ratios)
    noise = 1.4826 * float(np.median(np.abs(ratios - np.median(ratios))))
    bar = max(math.log(SPIKE_RATIO), SPIKE_SIGMAS * noise)
    return [(i, math.exp(r)) for i, r in zip(indices, ratios) if r > bar]


def check_spikes(c: Curves) -> list[Finding]:
    spikes = find_spikes(c.loss)
    if not spikes:
        return []
    worst_index, worst_ratio = max(spikes, key=lambda s: s[1])
    severity = "warning" if len(spikes) >= 3 or worst_ratio >= 3 else "info"  # one odd hard batch is not a trend
    where = ", ".join(f"{_step(c.steps[i])} (x{r:.1f})" for i, r in spikes[:5]) + (" ..." if len(spikes) > 5 else "")
    lr, grad = c.lr[worst_index], c.grad_norm[worst_index]
    extras = "".join([f", learning rate {_g(lr)}" if not math.isnan(lr) else "",
                      f", grad_norm {_g(grad)}" if not math.isnan(grad) else ""])
    return [Finding(
        "loss_spikes", severity, f"Loss spikes: {len(spikes)} step(s) jump above the recent median",
        f"spikes at steps {where}; the worst is x{worst_ratio:.1f} the preceding median at step "
        f"{_step(c.steps[worst_index])}{extras}.",
        "the learning rate is probably too high for this batch size: lower learning_rate, add warmup, "
        "or raise the effective batch (gradient_accumulation_steps).",
        {"steps": [float(c.steps[i]) for i, _ in spikes], "worst_ratio": worst_ratio})]


def check_overfitting(c: Curves) -> list[Finding]:
    ok = np.isfinite(c.eval_loss)
    steps, losses, epochs = c.eval_steps[ok], c.eval_loss[ok], c.eval_epochs[ok]
    if len(losses) < 3 or not np.isfinite(c.loss).any():
        return []
    best = int(np.argmin(losses))
    best_loss, last_loss = float(losses[best]), float(losses[-1])
    if best == len(losses) - 1 or last_loss <= best_loss * (1 + OVERFIT_RISE):
        return []
    smooth = rolling_median(c.loss, window_size(len(c.loss)))
    train_then, train_end = _at(smooth, c.steps, steps[best]), float(smooth[-1])
    if not train_end < train_then:
        return []  # eval rising with train flat or rising is not over-fitting
    return [Finding(
        "overfitting", "warning", f"Over-fitting since step {_step(steps[best])}",
        f"eval loss reached its minimum {_g(best_loss)} at step {_step(steps[best])}{_epoch_note(epochs, best)}, "
        f"then rose to {_g(last_loss)} at step {_step(steps[-1])} (+{100 * (last_loss / best_loss - 1):.1f}%) "
        f"while the smoothed train loss fell from {_g(train_then)} to {_g(train_end)}.",
        f"keep the checkpoint nearest step {_step(steps[best])} (load_best_model_at_end=true, "
        "early_stopping_patience=2), or train fewer epochs; more data, lora_dropout or weight_decay help too.",
        {"best_step": float(steps[best]), "best_eval_loss": best_loss, "last_eval_loss": last_loss,
         "train_loss_at_best": train_then, "train_loss_end": train_end})]


def check_memorizing(c: Curves) -> list[Finding]:
    finite = np.isfinite(c.loss)
    if finite.sum() < MIN_POINTS:
        return []
    smooth = rolling_median(c.loss, window_size(len(c.loss)))
    last_step = float(c.steps[-1])
    early = (smooth < MEMORIZE_LOSS) & (c.steps <= c.steps[0] + MEMORIZE_EARLY * (last_step - c.steps[0]))
    if not early.any():
        return []
    index = int(np.argmax(early))
    eval_note = ""
    if np.isfinite(c.eval_loss).any():
        eval_min = float(np.nanmin(c.eval_loss))
        eval_note = (f"; eval loss never went below {_g(eval_min)} (perplexity {_g(perplexity(eval_min))}), "
                     "so the model learned the training answers, not the task" if eval_min > 2 * MEMORIZE_LOSS else "")
    return [Finding(
        "memorizing", "warning", "Memorising the training set",
        f"smoothed train loss {_g(smooth[index])} (perplexity {_g(perplexity(smooth[index]))}) already at step "
        f"{_step(c.steps[index])}{_epoch_note(c.epochs, index)} of {_step(last_step)}{eval_note}.",
        "train fewer epochs (num_train_epochs), add more or more varied data (deduplicate near-copies), "
        "lower the learning rate, and hold out data (val_size=0.1) to watch eval loss.",
        {"step": float(c.steps[index]), "train_loss": float(smooth[index]), "last_step": last_step})]


def check_convergence(c: Curves) -> list[Finding]:
    ok = np.isfinite(c.loss)
    steps, loss = c.steps[ok], c.loss[ok]
    if len(loss) < MIN_POINTS:
        return []
    tail = steps >= steps[0] + (1 - TAIL_FRACTION) * (steps[-1] - steps[0])
    if tail.sum() < 5:
        return []
    x, y = steps[tail], loss[tail]
    slope, intercept, t = linear_trend(x, y)
    start, end = slope * x[0] + intercept, slope * x[-1] + intercept
    drop = start - end
    first = float(np.median(loss[: max(len(loss) // 10, 1)]))
    share = drop / (first - end) if first > end else 0.0
    falling = start > 0 and (drop > STILL_FALLING_REL * start or share > TAIL_SHARE)
    if not (falling and drop > STILL_FALLING_ABS and t < -TREND_T):
        return []
    eval_note = ""
    ev = c.eval_loss[np.isfinite(c.eval_loss)]
    if len(ev) >= 2 and ev[-1] < ev[:-1].min():
        eval_note = f"; eval loss is also still at its best at the last evaluation ({_g(ev[-1])})"
    return [Finding(
        "not_converged", "warning", "Not converged: the loss is still falling at the end",
        f"over the last {int(100 * TAIL_FRACTION)}% of steps ({_step(x[0])}-{_step(x[-1])}) the fitted loss "
        f"falls from {_g(start)} to {_g(end)} (-{100 * drop / start:.1f}%, trend t={t:.1f}), "
        f"{100 * share:.0f}% of the run's whole improvement{eval_note}.",
        "train longer (raise num_train_epochs or max_steps); if the learning rate was already small, "
        "a somewhat higher learning_rate may converge sooner.",
        {"tail_start_step": float(x[0]), "fit_start": start, "fit_end": end, "relative_drop": drop / start,
         "share_of_improvement": share, "t": t})]


def check_healthy(c: Curves, problems: list[Finding]) -> list[Finding]:
    notes = []
    ok = np.isfinite(c.loss)
    if ok.sum() < MIN_POINTS:
        notes.append(Finding("too_short", "info", "Too few logged steps to read trends",
                             f"{int(ok.sum())} train loss value(s) logged (at least {MIN_POINTS} are needed for "
                             f"trends){_short_run_numbers(c)}.",
                             "lower logging_steps or train longer.", {"points": int(ok.sum())}))
    if not np.isfinite(c.eval_loss).any():
        notes.append(Finding("no_eval", "info", "No evaluation rows",
                             "the log has no eval_loss, so over-fitting can't be seen.",
                             "set eval_strategy=steps (or epoch) with eval_dataset or val_size=0.1.", {}))
    if not problems and ok.sum() >= MIN_POINTS:
        loss = c.loss[ok]
        k = max(len(loss) // 10, 1)
        start, end = float(np.median(loss[:k])), float(np.median(loss[-k:]))
        steps = c.steps[ok]
        tail = steps >= steps[0] + (1 - TAIL_FRACTION) * (steps[-1] - steps[0])
        slope, _, t = linear_trend(steps[tail], loss[tail]) if tail.sum() >= 3 else (0.0, 0.0, 0.0)
        tail_drop = -slope * (steps[-1] - steps[tail][0]) / end if end > 0 else 0.0
        tail_se = abs(tail_drop / t) if t and math.isfinite(t) else 0.0
        ev = c.eval_loss[np.isfinite(c.eval_loss)]
        eval_note = f"; best eval loss {_g(ev.min())}, last {_g(ev[-1])}" if len(ev) else ""
        notes.append(Finding(
            "healthy", "info", "Healthy run: the loss fell and flattened",
            f"median train loss {_g(start)} over the first 10% of steps, {_g(end)} over the last 10% "
            f"(-{100 * (1 - end / start):.1f}%); over the last {int(100 * TAIL_FRACTION)}% the fitted trend is "
            f"{-100 * tail_drop:+.1f}% ± {100 * tail_se:.1f}% (the 'still falling' bar: "
            f"-{100 * STILL_FALLING_REL:g}% at {TREND_T:g} standard errors){eval_note}.",
            "nothing to change; evaluate the model.",
            {"start_loss": start, "end_loss": end, "tail_relative_drop": tail_drop, "tail_drop_se": tail_se}))
    return notes


def _short_run_numbers(c: Curves) -> str:
    """What a run too short for trends still shows: where the losses started and ended."""
    parts = []
    for name, steps, values in (("train loss", c.steps, c.loss), ("eval loss", c.eval_steps, c.eval_loss)):
        ok = np.isfinite(values)
        if ok.sum() >= 2:
            first, last = float(values[ok][0]), float(values[ok][-1])
            parts.append(f"{name} {_g(first)} at step {_step(steps[ok][0])} -> {_g(last)} at step "
                         f"{_step(steps[ok][-1])} ({100 * (last / first - 1):+.1f}%)" if first else "")
        elif ok.sum() == 1:
            parts.append(f"{name} {_g(float(values[ok][0]))} at step {_step(steps[ok][0])}")
    parts = [p for p in parts if p]
    return "; what it shows: " + "; ".join(parts) if parts else ""


def diagnose(c: Curves) -> list[Finding]:
    """Every finding for these curves, most severe first."""
    findings = check_divergence(c)
    if not findings:  # after a divergence the other readings are meaningless
        findings += check_spikes(c) + check_overfitting(c) + check_memorizing(c)
        if not any(f.code == "memorizing" for f in findings):  # a loss near 0 is not "still falling"
            findings += check_convergence(c)
    findings += check_healthy(c, [f for f in findings if f.severity != "info"])
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


# --- plots ---------------------------------------------------------------------------

def _figure():
    fig, (ax,) = new_figure()
    return fig, ax



def plot_loss(c: Curves, findings: list[Finding], path: Path) -> Path:
    fig, ax = _figure()
    draw_loss(ax, c.steps, c.loss, c.eval_steps, c.eval_loss)
    for f in findings:
        if f.code == "overfitting":
            ax.axvline(f.evidence["best_step"], color="tab:red", linestyle="--", label="eval minimum")
        if f.code == "diverged" and "non_finite" in f.evidence:
            ax.axvline(f.evidence["step"], color="black", linestyle=":", label="loss became NaN/inf")
        if f.code == "loss_spikes":
            spikes = np.isin(c.steps, f.evidence["steps"])
            ax.plot(c.steps[spikes], c.loss[spikes], "x", color="tab:red", label="spike")
    ax.set(title="Loss")
    ax.legend()
    return save_figure(fig, path)


def plot_perplexity(c: Curves, path: Path) -> Path:
    fig, ax = _figure()
    ok = np.isfinite(c.loss)
    if ok.any():
        smooth = ema(c.loss[ok], window_size(int(ok.sum())))
        ax.plot(c.steps[ok], [perplexity(v) for v in smooth], color="tab:blue", label="train perplexity (smoothed)")
    ev = np.isfinite(c.eval_ppl)
    if ev.any():
        ax.plot(c.eval_steps[ev], c.eval_ppl[ev], "o-", color="tab:orange", label="eval perplexity")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="perplexity (log scale)", title="Perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def plot_learning_rate(c: Curves, path: Path) -> Path | None:
    if not np.isfinite(c.lr).any() and not np.isfinite(c.grad_norm).any():
        return None
    fig, ax = _figure()
    ax.plot(c.steps, c.lr, color="tab:green", label="learning rate")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate and gradient norm")
    ax.grid(alpha=0.3)
    if np.isfinite(c.grad_norm).any():
        twin = ax.twinx()
        twin.plot(c.steps, c.grad_norm, color="tab:purple", alpha=0.6, linewidth=1, label="grad norm")
        twin.set_ylabel("grad norm")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    return save_figure(fig, path)


def plot_eval_metrics(c: Curves, path: Path) -> Path | None:
    """Task metrics (and any other evaluation metric) against the step."""
    series = {k: v for k, v in c.eval_metrics.items() if np.isfinite(v).any()}
    if not series:
        return None
    fig, ax = _figure()
    for name, values in series.items():
        ok = np.isfinite(values)
        ax.plot(c.eval_steps[ok], values[ok], "o-", label=name.removeprefix("eval_"))
    ax.set(xlabel="step", ylabel="value", title="Evaluation metrics")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_reward(c: Curves, path: Path) -> Path | None:
    """Online RL: the mean reward of each logging window against the step."""
    reward = c.train_metrics.get("reward")
    if reward is None or not np.isfinite(reward).any():
        return None
    fig, ax = _figure()
    ok = np.isfinite(reward)
    ax.plot(c.steps[ok], reward[ok], "-", label="reward")
    ax.set(xlabel="step", ylabel="mean reward", title="Reward")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def metric_table(c: Curves) -> dict[str, dict]:
    """first / best / last value of each evaluation metric, and the step of the best (higher
    is better, as for every task metric; losses are reported above)."""
    out = {}
    for name, values in c.eval_metrics.items():
        ok = np.isfinite(values)
        if not ok.any():
            continue
        steps, finite = c.eval_steps[ok], values[ok]
        lower = "loss" in name or "perplexity" in name
        best = int(np.argmin(finite) if lower else np.argmax(finite))
        out[name.removeprefix("eval_")] = {"first": float(finite[0]), "best": float(finite[best]),
                                           "best_step": float(steps[best]), "last": float(finite[-1])}
    return out


# --- the report ----------------------------------------------------------------------

def summarize(c: Curves) -> dict:
    def last(values: np.ndarray) -> float | None:
        finite = values[np.isfinite(values)]
        return float(finite[-1]) if len(finite) else None

    loss = c.loss[np.isfinite(c.loss)]
    ev = np.isfinite(c.eval_loss)
    best = int(np.nanargmin(np.where(ev, c.eval_loss, np.inf))) if ev.any() else None
    tps = c.tokens_per_second[np.isfinite(c.tokens_per_second)]
    return {
        "train_rows": len(c.steps), "eval_rows": len(c.eval_steps), "skipped_lines": c.skipped_lines,
        "last_step": float(max(c.steps.max(initial=0), c.eval_steps.max(initial=0))),
        "last_epoch": last(np.concatenate([c.epochs, c.eval_epochs])),
        "first_loss": float(loss[0]) if len(loss) else None, "last_loss": last(c.loss),
        "min_loss": float(loss.min()) if len(loss) else None,
        "best_eval_loss": float(c.eval_loss[best]) if best is not None else None,
        "best_eval_step": float(c.eval_steps[best]) if best is not None else None,
        "last_eval_loss": last(c.eval_loss), "last_eval_perplexity": last(c.eval_ppl),
        "last_learning_rate": last(c.lr),
        # The median: a window that held an evaluation or a checkpoint (logs written before the
        # loop excluded them) or the first, compiling, step must not drag the figure down.
        "median_tokens_per_second": float(np.median(tps)) if len(tps) else None,
    } | {f"{edge}_{name}": value for name, values in c.train_metrics.items()
         for edge, value in (("first", _first(values)), ("last", last(values)))}


def _first(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite[0]) if len(finite) else None


def render_markdown(run_dir: Path, findings: list[Finding], plots: list[Path], summary: dict,
                    metrics: dict | None = None) -> str:
    lines = [f"# Training report: {run_dir}", "", "## Findings", ""]
    for f in findings:
        lines += [f"- **[{f.severity}] {f.title}**: {f.detail}", f"  - *what to do*: {f.advice}"]
    lines += ["", "## Numbers", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {_g(value) if isinstance(value, float) else value} |"
              for key, value in summary.items() if value is not None]
    if metrics:
        lines += ["", "## Evaluation metrics", "", "| metric | first | best | at step | last |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {_g(m['first'])} | {_g(m['best'])} | {_step(m['best_step'])} | {_g(m['last'])} |"
                  for name, m in metrics.items()]
    lines += ["", "## Curves", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def run_report(run_dir: Path, out_dir: Path | None = None) -> ReportResult:
    """Read RUN_DIR/trainer_log.jsonl; write PNGs, report.md and report.json; return the findings.

    `out_dir` defaults to RUN_DIR/report. Each file is written atomically.
    """
    run_dir = Path(run_dir)
    curves = read_curves(find_log(run_dir))
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    findings = diagnose(curves)
    plots = [plot_loss(curves, findings, out_dir / "loss.png"), plot_perplexity(curves, out_dir / "perplexity.png")]
    lr_plot = plot_learning_rate(curves, out_dir / "learning_rate.png")
    plots += [lr_plot] if lr_plot else []
    metrics_plot = plot_eval_metrics(curves, out_dir / "eval_metrics.png")
    plots += [metrics_plot] if metrics_plot else []
    reward_plot = plot_reward(curves, out_dir / "reward.png")
    plots += [reward_plot] if reward_plot else []
    summary, metrics = summarize(curves), metric_table(curves)
    markdown = render_markdown(run_dir, findings, plots, summary, metrics)
    task_eval = task_eval_breakdown(run_dir, metrics, out_dir)
    if task_eval:
        markdown += f"\n## Task evaluation at step {task_eval[0]}\n\n" + task_eval[1].replace("## Error", "### Error")
    write_text_atomic(out_dir / "report.md", markdown)
    write_json_atomic(out_dir / "report.json", {
        "run_dir": str(run_dir), "summary": summary, "eval_metrics": metrics,
        "findings": [asdict(f) for f in findings], "plots": [p.name for p in plots]})
    return ReportResult(run_dir, out_dir, findings, plots, summary, metrics)


def task_eval_breakdown(run_dir: Path, metrics: dict, out_dir: Path) -> tuple[int, str] | None:
    """(step, markdown) of the error breakdown of the predictions kept during training
    (RUN_DIR/task_eval/step-N.jsonl, see evaluate/in_training.py): at the best step of the
    run's metric_for_best_model when that is a task metric, else at the last step."""
    from tunelab.evaluate.breakdown import write_breakdown
    from tunelab.evaluate.runner import parse_metrics, read_predictions, score
    from tunelab.evaluate.tasks import get_task

    files = {int(p.stem.split("-", 1)[1]): p for p in (run_dir / "task_eval").glob("step-*.jsonl")
             if p.stem.split("-", 1)[1].isdigit()}
    if not files:
        return None
    step = max(files)
    chosen = _config_value(run_dir, "metric_for_best_model")
    best = metrics.get(str(chosen).removeprefix("eval_")) if chosen else None
    if best and int(best["best_step"]) in files:
        step = int(best["best_step"])
    rows = read_predictions(files[step])
    task = get_task(rows[0].get("task") or "generic")
    metric_names = parse_metrics(task, ",".join(_config_value(run_dir, "eval_metrics") or []))
    score(task, rows, tuple(m for m in metric_names if m != "ppl") or task.default_metrics)
    text = write_breakdown(task, rows, out_dir / "task_eval")
    return (step, (out_dir / "task_eval" / "breakdown.md").read_text(encoding="utf-8")) if text else None


def _config_value(run_dir: Path, key: str):
    import yaml

    path = run_dir / "config.yaml"
    try:
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(key) if path.is_file() else None
    except yaml.YAMLError:
        return None


def format_findings(result: ReportResult) -> str:
    """The findings as plain text for the terminal, most severe first."""
    head = f"{result.run_dir}: {len(result.problems)} problem(s) found; report in {result.out_dir / 'report.md'}"
    lines = [head]
    for f in result.findings:
        label = "next" if f.severity == "info" else "fix"
        lines += [f"  [{f.severity}] {f.title}", f"      {f.detail}", f"      {label}: {f.advice}"]
    for name, m in result.eval_metrics.items():
        lines.append(f"  {name}: {_g(m['first'])} -> {_g(m['last'])} (best {_g(m['best'])} at step "
                     f"{_step(m['best_step'])})")
    if result.summary.get("skipped_lines"):
        lines.append(f"  note: {result.summary['skipped_lines']} unreadable line(s) in {LOG_NAME} were skipped")
    return "\n".join(lines)
