"""Importing PEFT prompt adapters: the imported artifacts reproduce what PEFT computes.

Seq2seq adapters are held against ``PeftModel.generate``. For decoder-only adapters
``PeftModel.generate`` is not a reference (DESIGN §9: it disagrees with the no-cache ground
truth in peft 0.21.2), so they are held against PEFT's forward logits and against a greedy
loop of full forwards over ``[prompt; input; tokens so far]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import (
    MultitaskPromptTuningConfig,
    PeftModel,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

from prompts import (
    ArtifactError,
    Backbone,
    compose_prompt,
    compose_prompts,
    import_peft_mpt,
    import_peft_prompt_tuning,
    load_artifact_dir,
    load_backbone,
    prepend_prompts,
)
from prompts.cli import import_peft_main
from rankone_cli import main as rankone_main

# peft 0.21.2 calls a transformers 5 method that is deprecated; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

L, NUM_TASKS, NEW_TOKENS = 4, 3, 6
TEXTS = ["the quick brown fox", "question: what is two plus two?"]
TARGETS = ["four", "blue house", "great movie"]  # one target per task id


def _train(backbone: Backbone, config, out: Path, *, steps: int = 4) -> Path:
    """A PEFT prompt adapter trained a few steps on ``backbone`` so its factors are not the init."""
    torch.manual_seed(0)
    peft_model = get_peft_model(backbone.model, config)
    tok = backbone.tokenizer
    params = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=0.05)
    peft_model.train()
    multitask = isinstance(config, MultitaskPromptTuningConfig)
    for step in range(steps):
        task = step % NUM_TASKS
        if backbone.is_seq2seq:
            batch = tok([TEXTS[step % 2]], return_tensors="pt")
            labels = tok([TARGETS[task]], return_tensors="pt")["input_ids"]
        else:
            batch = tok([f"{TEXTS[step % 2]} {TARGETS[task]}"], return_tensors="pt")
            labels = batch["input_ids"]
        extra = {"task_ids": torch.tensor([task])} if multitask else {}
        loss = peft_model(**batch, labels=labels, **extra).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    peft_model.save_pretrained(out)
    return out


def _mpt_config(task_type: TaskType, submodules: int = 1) -> MultitaskPromptTuningConfig:
    return MultitaskPromptTuningConfig(
        task_type=task_type,
        num_virtual_tokens=L,
        num_transformer_submodules=submodules,
        num_tasks=NUM_TASKS,
        num_ranks=1,
    )


def _peft(model_dir: Path, adapter: Path) -> PeftModel:
    """A fresh PeftModel over a fresh copy of the backbone (``get_peft_model`` wraps in place)."""
    return PeftModel.from_pretrained(load_backbone(model_dir).model, adapter).eval()


@pytest.fixture(scope="module")
def t5_adapter(tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("peft") / "t5-mpt"
    return _train(load_backbone(tiny_t5_dir), _mpt_config(TaskType.SEQ_2_SEQ_LM), out)


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("peft") / "llama-mpt"
    return _train(load_backbone(tiny_llama_dir), _mpt_config(TaskType.CAUSAL_LM), out)


def _our_prompts(backbone: Backbone, adapter: Path) -> torch.Tensor:
    """Every task's prompt [T, L, d], composed from the imported artifacts."""
    shared, tasks = import_peft_mpt(adapter, backbone=backbone.fingerprint, shared_id="fam")
    assert [t.name for t in tasks] == [f"fam-task{i}" for i in range(NUM_TASKS)]
    return torch.stack([compose_prompt(shared.prompt, t.u, t.v) for t in tasks])


def _generate(backbone: Backbone, texts: list[str], prompts: torch.Tensor) -> list[list[int]]:
    batch = backbone.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        inputs = prepend_prompts(
            backbone.embed(batch["input_ids"]),
            batch["attention_mask"],
            prompts,
            causal=not backbone.is_seq2seq,
        )
        out = backbone.model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=backbone.tokenizer.pad_token_id,
        )
    return out.tolist()


def test_seq2seq_mpt_matches_peft_generate(tiny_t5_dir: Path, t5_adapter: Path) -> None:
    backbone = load_backbone(tiny_t5_dir)
    prompts = _our_prompts(backbone, t5_adapter)  # [T, L, d]
    peft_model = _peft(tiny_t5_dir, t5_adapter)
    batch = backbone.tokenizer(TEXTS, return_tensors="pt", padding=True)
    outputs = []
    for task in range(NUM_TASKS):
        with torch.no_grad():
            expected = peft_model.generate(
                **batch,
                task_ids=torch.full((len(TEXTS),), task),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            ).tolist()
        ours = _generate(backbone, TEXTS, prompts[task].expand(len(TEXTS), L, backbone.dim))
        assert ours == expected, f"task {task}"
        outputs.append(ours)
    assert len({json.dumps(o) for o in outputs}) > 1, "tasks should decode differently"


def test_causal_mpt_matches_peft_forward_logits(tiny_llama_dir: Path, llama_adapter: Path) -> None:
    backbone = load_backbone(tiny_llama_dir)
    prompts = _our_prompts(backbone, llama_adapter)
    peft_model = _peft(tiny_llama_dir, llama_adapter)
    for text in TEXTS:
        batch = backbone.tokenizer([text] * NUM_TASKS, return_tensors="pt")
        with torch.no_grad():
            expected = peft_model(**batch, task_ids=torch.arange(NUM_TASKS)).logits  # [T, L+n, V]
            inputs = prepend_prompts(
                backbone.embed(batch["input_ids"]), batch["attention_mask"], prompts, causal=True
            )
            ours = backbone.model(**inputs._asdict()).logits
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours[0], ours[1]), "tasks should give different logits"


def _ground_truth(backbone: Backbone, text: str, prompt: torch.Tensor) -> list[int]:
    """Greedy decoding by full forwards without cache over [prompt; input; tokens so far]."""
    ids = backbone.tokenizer(text, return_tensors="pt")["input_ids"][0].tolist()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            embeds = torch.cat([prompt, backbone.embed(torch.tensor(ids + new))])[None]
            logits = backbone.model(inputs_embeds=embeds, use_cache=False).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == backbone.tokenizer.eos_token_id:
                break
    return new


def test_causal_mpt_generate_matches_ground_truth(
    tiny_llama_dir: Path, llama_adapter: Path
) -> None:
    backbone = load_backbone(tiny_llama_dir)
    prompts = _our_prompts(backbone, llama_adapter)
    for task in range(NUM_TASKS):
        ours = _generate(backbone, TEXTS, prompts[task].expand(len(TEXTS), L, backbone.dim))
        for i, text in enumerate(TEXTS):
            expected = _ground_truth(backbone, text, prompts[task])
            assert ours[i][: len(expected)] == expected, f"task {task}, input {i}"


def test_prompt_tuning_import_matches_peft_forward(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    backbone = load_backbone(tiny_gpt2_dir)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=L)
    adapter = _train(backbone, config, tmp_path / "pt", steps=2)
    backbone = load_backbone(tiny_gpt2_dir)
    shared, task = import_peft_prompt_tuning(
        adapter, backbone=backbone.fingerprint, shared_id="pt", task_name="pt-task"
    )
    assert task.meta["identity_factors"] is True and task.rank == 1
    prompt = compose_prompts(
        shared.prompt[None], torch.zeros(1, dtype=torch.long), task.u[None], task.v[None]
    )
    assert torch.equal(prompt[0], shared.prompt)
    peft_model = _peft(tiny_gpt2_dir, adapter)
    batch = backbone.tokenizer(TEXTS[1:], return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        inputs = prepend_prompts(
            backbone.embed(batch["input_ids"]), batch["attention_mask"], prompt, causal=True
        )
        ours = backbone.model(**inputs._asdict()).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# --- the CLI and refusals -----------------------------------------------------------------


def test_cli_imports_mpt(
    tiny_t5_dir: Path, t5_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "artifacts"
    argv = [str(t5_adapter), "--model", str(tiny_t5_dir), "--out", str(out), "--shared-id", "fam"]
    assert import_peft_main([*argv, "--task-names", "qa,color,sentiment"]) == 0
    printed = capsys.readouterr().out
    assert "shared prompt 'fam'" in printed and "task 'sentiment'" in printed
    backbone = load_backbone(tiny_t5_dir)
    loaded = load_artifact_dir(out, backbone=backbone.fingerprint)
    assert sorted(loaded.tasks) == ["color", "qa", "sentiment"]
    shared, tasks = import_peft_mpt(t5_adapter, backbone=backbone.fingerprint, shared_id="fam")
    assert torch.equal(loaded.shared["fam"].prompt, shared.prompt)
    assert torch.equal(loaded.tasks["color"].u, tasks[1].u)
    assert torch.equal(loaded.tasks["color"].v, tasks[1].v)
    # A second import into the same directory does not silently replace the artifacts.
    assert import_peft_main([*argv, "--task-names", "qa,color,sentiment"]) == 2
    assert "already exist(s); pass --force" in capsys.readouterr().err
    assert import_peft_main([*argv, "--task-names", "qa,color,sentiment", "--force"]) == 0


def test_cli_imports_prompt_tuning(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    backbone = load_backbone(tiny_gpt2_dir)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=L)
    get_peft_model(backbone.model, config).save_pretrained(tmp_path / "pt")
    out = tmp_path / "artifacts"
    argv = [str(tmp_path / "pt"), "--model", str(tiny_gpt2_dir), "--out", str(out)]
    assert import_peft_main([*argv, "--shared-id", "pt"]) == 0
    loaded = load_artifact_dir(out, backbone=backbone.fingerprint)
    assert list(loaded.tasks) == ["pt"] and loaded.tasks["pt"].shared == "pt"


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert import_peft_main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    return captured.err


def test_cli_refusals(
    tiny_t5_dir: Path, t5_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model", str(tiny_t5_dir), "--out", str(tmp_path / "o"), "--shared-id", "fam"]
    err = _cli_error([str(tmp_path), *base], capsys)
    assert "is not a PEFT adapter directory" in err
    err = _cli_error([str(t5_adapter), *base, "--task-names", "a,b"], capsys)
    assert "adapter has 3 tasks, 2 names given" in err
    err = _cli_error([str(t5_adapter), *base, "--task-name", "x"], capsys)
    assert "--task-name is for PROMPT_TUNING" in err
    err = _cli_error([str(t5_adapter), *base, "--task-names", "a,B,c"], capsys)
    assert "invalid task name 'B'" in err
    err = _cli_error([str(t5_adapter), *base, "--task-names", "a,b,a"], capsys)
    assert "task names must be distinct" in err
    model_args = ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    err = _cli_error([str(t5_adapter), *model_args, "--shared-id", "fam"], capsys)
    assert "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_rankone_command_dispatches_import_peft(
    tiny_t5_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["import-peft", str(tmp_path), "--model", str(tiny_t5_dir), "--out", str(tmp_path)]
    assert rankone_main([*argv, "--shared-id", "fam"]) == 2
    assert "is not a PEFT adapter directory" in capsys.readouterr().err


def test_refuses_adapter_that_prompts_the_decoder(tiny_t5_dir: Path, tmp_path: Path) -> None:
    backbone = load_backbone(tiny_t5_dir)
    config = _mpt_config(TaskType.SEQ_2_SEQ_LM, submodules=2)
    get_peft_model(backbone.model, config).save_pretrained(tmp_path / "two")
    with pytest.raises(ArtifactError, match="num_transformer_submodules=2 prompts the decoder"):
        import_peft_mpt(tmp_path / "two", backbone=backbone.fingerprint, shared_id="fam")


def test_refuses_seq2seq_adapter_with_default_submodules(t5_adapter: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "default"
    adapter.mkdir()
    config = json.loads((t5_adapter / "adapter_config.json").read_text())
    config["num_transformer_submodules"] = None  # PEFT reads this as 2 for SEQ_2_SEQ_LM
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    weights = (t5_adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(ArtifactError, match="num_transformer_submodules=2"):
        import_peft_mpt(adapter, backbone="t5-x", shared_id="fam")


def test_refuses_directory_without_adapter(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"expected adapter_config\.json and"):
        import_peft_mpt(tmp_path, backbone="t5-x", shared_id="fam")
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ArtifactError, match="no pickles"):
        import_peft_prompt_tuning(tmp_path, backbone="t5-x", shared_id="pt", task_name="pt")


def test_refuses_wrong_peft_type(t5_adapter: Path) -> None:
    with pytest.raises(ArtifactError, match="expected 'PROMPT_TUNING'"):
        import_peft_prompt_tuning(t5_adapter, backbone="t5-x", shared_id="pt", task_name="pt")
