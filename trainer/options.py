"""The options of every stage, one typed dataclass each; field docstrings are the ``--help``.

``__post_init__`` checks each set once (ranges, cross-field rules) and raises ``TrainerError``
with what to change. Paths to data, models and artifacts are checked when they are opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from trainer.errors import TrainerError


def _positive(**values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise TrainerError(f"option --{name.replace('_', '-')} must be > 0, got {value}")


def _non_negative(**values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise TrainerError(f"option --{name.replace('_', '-')} must be >= 0, got {value}")


@dataclass
class DataOptions:
    """Where the JSONL lives and how it is cut into batches."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data_dir", "out")

    model: str | None = None
    """Backbone: a local Hugging Face model directory, a .gguf file (converted once into a
    cache, $RANKONE_GGUF_CACHE_DIR) or a hub id when a hub is reachable."""
    data_dir: Path | None = None
    """Data folder, one sub-folder per task: <data-dir>/<task>/{train,validation,test}.jsonl, each line {"input": ..., "target": ...}."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to use (sub-folders of --data-dir); default: every sub-folder with a train.jsonl."""
    out: Path | None = None
    """Output folder: shared/, tasks/, run.json, log.jsonl, plots, checkpoints/."""
    shots: int | None = None
    """Few-shot: keep k training examples per task, sampled with --seed (default: all)."""
    max_input_length: int = 256
    """Input tokens kept per example (longer inputs are truncated)."""
    max_target_length: int = 32
    """Target tokens kept per example (longer targets are truncated)."""
    eval_limit: int | None = 200
    """Validation/test examples used per task for evaluation (default 200; none = all)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """Seed of prompt init, few-shot sampling and batch order."""

    def __post_init__(self) -> None:
        _positive(
            shots=self.shots,
            max_input_length=self.max_input_length,
            max_target_length=self.max_target_length,
            eval_limit=self.eval_limit,
        )
        for task in self.tasks:
            if not task or "/" in task or task.startswith("."):
                raise TrainerError(
                    f"invalid task name {task!r}: use the name of a sub-folder of --data-dir"
                )


@dataclass
class TrainOptions(DataOptions):
    """Options shared by the training stages."""

    prompt_length: int = 20
    """L: soft-prompt rows prepended to the input (the paper uses 100; adapt takes its source's L)."""
    rank: int = 1
    """r: rank of each task's factors U [L, r], V [r, d]."""
    steps: int = 300
    """Optimizer steps (each of --batch-size × --grad-accum examples, per process)."""
    batch_size: int = 8
    """Examples per micro-batch and process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw (torch) or adafactor (transformers, fixed lr, no relative step)."""
    lr: float = 0.3
    """Peak learning rate (prompt tuning likes large ones, 0.3 in Lester et al. and MPT)."""
    weight_decay: float = 1e-5
    """Weight decay of the prompt parameters."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to --lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0 = no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass on GPU; CPU always runs fp32."""
    sampling_temperature: float = 1.0
    """Task sampling across tasks: p_k ∝ n_k^(1/T) (1 = examples-proportional, large = uniform)."""
    log_every: int = 10
    """Write a log.jsonl line every N steps."""
    eval_every: int = 0
    """Validation loss every N steps, keeping the best prompts (0 = only at the end)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    resume: bool = False
    """Continue from <out>/checkpoints/ where an earlier run of the same command stopped."""
    stop_after: int | None = None
    """Stop this process after N steps (the schedule still spans --steps); resume later with --resume."""
    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(
            prompt_length=self.prompt_length,
            rank=self.rank,
            steps=self.steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr=self.lr,
            sampling_temperature=self.sampling_temperature,
            log_every=self.log_every,
            stop_after=self.stop_after,
        )
        _non_negative(
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
        )
        if self.rank > 64:
            raise TrainerError(f"option --rank {self.rank} is above the artifact limit 64")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise TrainerError(
                f"--warmup-steps {self.warmup_steps} must be below --steps {self.steps}"
            )


def _check_init_texts(text: str | None, mapping_file: Path | None) -> None:
    """--init-text and --init-texts: a text with words, and not both."""
    if text is not None and not text.strip():
        raise TrainerError("--init-text is empty; give the instruction's words")
    if text and mapping_file is not None:
        raise TrainerError(
            "--init-text and --init-texts both given: use --init-text for one text for "
            "every task, or --init-texts FILE for one text per task"
        )


@dataclass
class TeachOptions(TrainOptions):
    """Plain prompt tuning (Lester et al. 2021): one prompt per source task, the teachers."""

    init: Literal["auto", "vocab", "random", "text"] = "auto"
    """Prompt init: text (the input embeddings of the task's instruction, repeated or cut to L rows: Lester et al.'s text init; needs a text per task), vocab (embeddings of random vocabulary tokens), random (uniform ±--init-scale), auto (text for tasks with an init text, vocab for the others)."""
    init_scale: float = 0.5
    """Half-width of the uniform random init."""
    init_text: str | None = None
    """Instruction whose token embeddings initialise every task's prompt, e.g. 'Classify the sentiment of the review.'"""
    init_texts: Path | None = None
    """JSON or YAML file mapping task → instruction, for per-task text init (tasks it does not name use <data-dir>/<task>/instruction.txt if present)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(init_scale=self.init_scale)
        _check_init_texts(self.init_text, self.init_texts)
        if self.init in ("vocab", "random") and (self.init_text or self.init_texts):
            raise TrainerError(
                f"--init {self.init} ignores --init-text/--init-texts; drop them or use --init text"
            )


FactorInit = Literal["ones", "peft", "fit"]


@dataclass
class DistillOptions(TrainOptions):
    """MPT source training: shared P and every source task's (U_k, V_k), distilled from teachers."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data_dir", "out", "teachers")

    teachers: Path | None = None
    """Output folder of `teach` (its tasks/ and shared/); every source task needs a teacher."""
    shared_id: str = "mpt"
    """Id of the shared prompt written to <out>/shared/<id>.safetensors."""
    shared_init: Literal["teachers", "vocab", "random"] = "teachers"
    """Init of P: teachers (average of the teachers' prompts), vocab or random."""
    factor_init: FactorInit = "ones"
    """Init of U, V: ones (U@V = 1 + noise, each task prompt = P at step 0; the default: on SmolLM2-135M it reached validation CE 3.55 after 16 distill steps where peft was still at 9.80, see bench/results/mpt_real.md), peft (std 0.02, task prompt ≈ 0 at step 0, PEFT's) or fit (P and every U, V from the closed-form rank-one fit of the teachers, P ⊙ (U_k V_k) ≈ teacher k; rank 1 only, replaces --shared-init)."""
    init_from: Path | None = None
    """Artifact folder (shared/ + tasks/, e.g. an earlier distill) whose shared prompt and source task factors P, U_k, V_k start this run (replaces --shared-init and --factor-init)."""
    factor_noise: float = 0.01
    """Noise std added to the ones init (breaks the symmetry between tasks)."""
    lambda_kl: float = 1.0
    """Weight of KL(teacher ‖ student) on the output token distributions."""
    lambda_hid: float = 1.0
    """Weight of the MSE between teacher and student last hidden states (seq2seq: encoder over the input tokens; decoder-only: last layer over input+target tokens)."""
    kl_temperature: float = 1.0
    """Softmax temperature T of the distillation KL (scaled by T²)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(kl_temperature=self.kl_temperature)
        _non_negative(
            lambda_kl=self.lambda_kl, lambda_hid=self.lambda_hid, factor_noise=self.factor_noise
        )
        if self.factor_init == "fit" and self.rank != 1:
            raise TrainerError(
                f"--factor-init fit is a rank-one fit; use --rank 1 (got {self.rank})"
            )


@dataclass
class AdaptOptions(TrainOptions):
    """Target adaptation: new task(s) start from the average of the source factors."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data_dir", "out", "source")

    source: Path | None = None
    """Output folder of `distill`: its shared prompt and source task factors."""
    shared_id: str | None = None
    """Which shared prompt in --source to start from (needed only if it holds several)."""
    mode: Literal["factors-only", "paper", "multi-target"] = "factors-only"
    """factors-only: P frozen (bit-identical), only U, V train, tasks compose with the served P; paper: P fine-tuned too, one new shared prompt per task; multi-target: all --tasks jointly, one new shared prompt for the group."""
    train_shared: bool = False
    """Shorthand for --mode paper (or multi-target with --mode multi-target)."""
    new_shared_id: str | None = None
    """Id of the new shared prompt in paper/multi-target mode (default: <source id>-<task> or <source id>-mt)."""
    factor_init: Literal["auto", "fit", "source", "ones", "peft"] = "auto"
    """Init of U, V: fit (the factors whose composed prompt is closest to the text init of the task's instruction, P ⊙ (U V) ≈ text: needs --init-text, --init-texts or <data-dir>/<task>/instruction.txt), source (average of the source tasks' factors), ones, peft; auto (the default): fit for a task with an instruction, source for the others. On SmolLM2 (bench/results/task_quality.md, capital, k = 32) fit reached 37 % exact match at lr 0.3 where source reached 0 %."""
    init_text: str | None = None
    """The task's instruction (one for every task of the run), e.g. 'What is the capital of this country?': the fit init starts from its text init."""
    init_texts: Path | None = None
    """JSON or YAML file mapping task → instruction (tasks it does not name use <data-dir>/<task>/instruction.txt if present)."""
    factor_noise: float = 0.0
    """Noise std added to the ones init."""
    lr: float | None = None  # type: ignore[assignment]
    """Peak learning rate (default: 0.3 in factors-only mode, 0.1 in paper and multi-target mode, where P trains too: each the best of bench/mpt_real's validation sweep on SmolLM2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_shared and self.mode == "factors-only":
            self.mode = "paper"
        if self.lr is None:
            self.lr = ADAPT_LR[self.mode]
        _non_negative(factor_noise=self.factor_noise)
        _check_init_texts(self.init_text, self.init_texts)
        if self.factor_init in ("source", "ones", "peft") and (self.init_text or self.init_texts):
            raise TrainerError(
                f"--factor-init {self.factor_init} ignores --init-text/--init-texts; drop them "
                "or use --factor-init fit (or auto)"
            )


# adapt's default lr per mode: what bench/mpt_real chose on validation loss from {0.3, 0.1}
# (bench/results/mpt_real.md: factors-only 1.53 vs 1.93 at 0.3; paper 1.20 vs 1.68 and
# multi-target 1.53 vs 1.98 at 0.1).
ADAPT_LR = {"factors-only": 0.3, "paper": 0.1, "multi-target": 0.1}


@dataclass
class EvaluateOptions(DataOptions):
    """Exact match, accuracy and token F1 per task for several artifact sets, greedy decoding."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data_dir", "out")

    methods: list[str] = field(default_factory=list)
    """Artifact sets to compare as NAME=DIR (e.g. mpt=runs/adapt pt=runs/teach); a task missing from a set is skipped for it."""
    bare: bool = True
    """Also evaluate the bare backbone without any prompt (--no-bare to skip)."""
    split: Literal["test", "validation", "train"] = "test"
    """Split to evaluate."""
    max_new_tokens: int = 32
    """Greedy decoding length limit."""
    batch_size: int = 16
    """Examples per generation batch."""
    progress: bool = True
    """Show a tqdm progress bar over (method, task) pairs (--no-progress to hide it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        for spec in self.methods:
            if "=" not in spec or not spec.split("=", 1)[0] or not spec.split("=", 1)[1]:
                raise TrainerError(
                    f"--methods entry {spec!r}: expected NAME=DIR, e.g. mpt=runs/adapt"
                )
        if not self.methods and not self.bare:
            raise TrainerError("nothing to evaluate: give --methods NAME=DIR ... or keep --bare on")
