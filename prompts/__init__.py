"""rankone core: prompt composition, the artifact format and backbone loading.

Shared by the trainer and the server; imports torch, transformers and safetensors only.
"""

from prompts.artifacts import (
    FORMAT,
    MAX_RANK,
    NAME_PATTERN,
    ArtifactDir,
    SharedPrompt,
    TaskFactors,
    check_name,
    check_task_fits,
    decode_shared,
    decode_task,
    encode_shared,
    encode_task,
    from_base64,
    load_artifact_dir,
    load_shared,
    load_task,
    save_shared,
    save_task,
    shared_path,
    task_path,
    to_base64,
    write_atomic,
)
from prompts.backbone import (
    Backbone,
    backbone_fingerprint,
    input_embeddings,
    is_gguf_path,
    load_backbone,
    resolve_dtype,
)
from prompts.compose import compose_prompt, compose_prompts, identity_factors
from prompts.errors import ArtifactError, BackboneMismatchError, RankoneError
from prompts.gguf import converted_copy, smollm2_gguf_path
from prompts.inputs import PromptedInputs, position_ids_from_mask, prepend_prompts
from prompts.peft_import import import_peft_mpt, import_peft_prompt_tuning

__all__ = [
    "FORMAT",
    "MAX_RANK",
    "NAME_PATTERN",
    "ArtifactDir",
    "ArtifactError",
    "Backbone",
    "BackboneMismatchError",
    "PromptedInputs",
    "RankoneError",
    "SharedPrompt",
    "TaskFactors",
    "backbone_fingerprint",
    "check_name",
    "check_task_fits",
    "compose_prompt",
    "compose_prompts",
    "converted_copy",
    "decode_shared",
    "decode_task",
    "encode_shared",
    "encode_task",
    "from_base64",
    "identity_factors",
    "import_peft_mpt",
    "import_peft_prompt_tuning",
    "input_embeddings",
    "is_gguf_path",
    "load_artifact_dir",
    "load_backbone",
    "load_shared",
    "load_task",
    "position_ids_from_mask",
    "prepend_prompts",
    "resolve_dtype",
    "save_shared",
    "save_task",
    "shared_path",
    "smollm2_gguf_path",
    "task_path",
    "to_base64",
    "write_atomic",
]
