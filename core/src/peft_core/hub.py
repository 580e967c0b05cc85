"""Pushing adapters to the Hugging Face Hub (``PeftModel.push_to_hub``) with a generated model card.

Loading needs nothing here: ``PeftModel.from_pretrained`` resolves a repo id through
``huggingface_hub.hf_hub_download`` (see :mod:`peft_core.serialization`). ``huggingface_hub`` is imported
inside the functions, so ``import peft_core`` stays light.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from peft_core.errors import PeftError

if TYPE_CHECKING:
    from peft_core.model import PeftModel
    from peft_core.plugins import Method

DEFAULT_COMMIT_MESSAGE = "Upload adapter with peft-core"
LIBRARY_NAME = "peft-core"
MODEL_CARD_NAME = "README.md"
# A Hub model id ("gpt2", "org/name"). A local directory is no base model the Hub can link to, and its
# path (a home directory, a temporary folder) has no place in a public card.
_HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# The transformers class that loads the base model, by task type, for the card's loading code.
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def push_to_hub(
    peft_model: PeftModel, repo_id: str, *, private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE, token: str | bool | None = None, revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload ``peft_model``'s adapters and a model card (``README.md``) to the Hub repo ``repo_id``.

    The repo is created if needed (``private=None`` keeps the Hub's default; the flag does not change an
    existing repo). The files are ``save_pretrained``'s: every adapter, and ``peft_stack.json`` for a stack.
    ``revision`` names the branch to commit to, created from the default branch if missing;
    ``create_pr=True`` opens a pull request against the default branch instead of committing to it. Returns
    what ``HfApi.upload_folder`` returns (a ``CommitInfo``: ``oid``, ``commit_url``, ``pr_url``, ...).
    """
    if create_pr and revision not in (None, "main"):
        # Checked before anything is created or uploaded: the Hub opens pull requests against main only.
        raise PeftError(f"create_pr=True opens a pull request against the default branch; revision={revision!r} "
                        f"cannot be combined with it. Push to the branch (without create_pr) or drop revision.")
    if not commit_message:
        raise PeftError("push_to_hub needs a non-empty commit_message.")
    from huggingface_hub import HfApi

    from peft_core.serialization import atomic_write_bytes

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=_staging_root()) as folder:
        # Saved before the repo is created, so that a model that cannot be saved leaves no empty repo behind.
        peft_model.save_pretrained(folder)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        repo_id = repo.repo_id  # with the namespace the Hub chose when none was given
        branch = revision if revision not in (None, "main") and not create_pr else None
        card = model_card(peft_model, repo_id, revision=branch)
        atomic_write_bytes(os.path.join(folder, MODEL_CARD_NAME), card.encode())
        if branch is not None and not branch.startswith("refs/pr/"):
            # upload_folder commits only to existing branches; a pull request's ref exists already.
            api.create_branch(repo_id, branch=branch, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token, revision=revision,
            create_pr=create_pr,
        )


def _staging_root() -> str:
    """The folder pushes stage their files in, cleared of the folders of pushes whose process is gone (killed
    before ``TemporaryDirectory`` could clean up): each is named after its process id."""
    root = os.path.join(tempfile.gettempdir(), "peft-core-push")
    os.makedirs(root, exist_ok=True)
    for entry in os.scandir(root):
        pid = entry.name.split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or a platform that cannot tell: leave its folder alone
    return True


def model_card(peft_model: PeftModel, repo_id: str, revision: str | None = None) -> str:
    """The ``README.md`` that :func:`push_to_hub` uploads: YAML metadata for the Hub, then the base model, each
    adapter's method, config and size, and how to load the repo with peft-core and with Hugging Face PEFT."""
    # huggingface_hub's ModelCard writes the metadata block as the Hub reads it (key names, YAML quoting,
    # fields left out when unset), as transformers and Hugging Face PEFT write theirs.
    from huggingface_hub import ModelCard, ModelCardData

    from peft_core.plugins import registry

    names = list(peft_model.peft_config)
    configs = [peft_model.peft_config[name] for name in names]
    registered = [registry().method_for_config(config) for config in configs]
    methods = [method.name for method in registered]
    base = next((c.base_model_name_or_path for c in configs if c.base_model_name_or_path), None)
    hub_base = base if base and _HUB_MODEL_ID.fullmatch(base) and not os.path.exists(base) else None
    stacked = [n for n in peft_model.active_adapters if n in names]

    tags = [LIBRARY_NAME, *dict.fromkeys(methods)]
    if hub_base:
        tags.append(f"base_model:adapter:{hub_base}")  # the Hub lists the repo among the base model's adapters
    metadata = ModelCardData(base_model=hub_base, library_name=LIBRARY_NAME, tags=tags)

    trainable, total = peft_model.get_nb_trainable_parameters()
    base_text = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else \
        "a model that is not on the Hub (the config's `base_model_name_or_path` is a local path or unset)"
    method_text = ", ".join(dict.fromkeys(methods))
    lines = [
        f"# {repo_id.rsplit('/', 1)[-1]}", "",
        f"{'Adapters' if len(names) > 1 else 'An adapter'} ({method_text}) for {base_text}, saved with "
        f"[peft-core](https://pypi.org/project/peft-core/) in the Hugging Face PEFT format.", "",
        f"Trainable parameters when pushed: {trainable:,d} of {total:,d} ({_share(trainable, total)}).", "",
    ]
    if len(stacked) > 1:
        lines += [f"The adapters form a stack, applied in this order: {', '.join(f'`{n}`' for n in stacked)} "
                  f"(listed in `peft_stack.json`); peft-core loads and activates all of them.", ""]
    for name, config, method in zip(names, configs, methods, strict=True):
        size = sum(t.numel() for t in peft_model._adapter_tensors(name, for_saving=True).values())
        where = "the repo's top folder" if name == "default" else f"the folder `{name}/`"
        lines += [
            f"## Adapter `{name}`", "",
            f"Method: {method} (`{config.peft_type}`), in {where}; {size:,d} saved parameters. Its config:", "",
            "```json", config.to_json_string(inference_mode=True).rstrip(), "```", "",
        ]
    install = _install_command(registered)
    lines += _loading_section(repo_id, hub_base, configs[0].task_type, names, stacked, revision, install)
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _install_command(registered: list[Method]) -> str:
    """``pip install peft-core`` and the distributions that registered the adapters' methods; a method
    registered from code (no distribution) is named instead."""
    packages = dict.fromkeys(["peft-core", *(m.package for m in registered if m.package)])
    unpackaged = dict.fromkeys(m.name for m in registered if not m.package)
    command = f"`pip install {' '.join(packages)}`"
    return command + (f" and the plugin of {', '.join(unpackaged)}" if unpackaged else "")


def _loading_section(
    repo_id: str, hub_base: str | None, task_type: str | None, names: list[str], stacked: list[str],
    revision: str | None, install: str,
) -> list[str]:
    auto_class = _AUTO_CLASSES.get(task_type or "", "AutoModel")
    at_revision = f", revision={revision!r}" if revision else ""

    def where(name: str) -> str:  # save_pretrained puts "default" at the top, any other adapter in its folder
        return "" if name == "default" else f", adapter_name={name!r}, subfolder={name!r}"

    def extra(loaded: list[str]) -> list[str]:
        return [f"model.load_adapter({repo_id!r}{where(n)}{at_revision})" for n in names if n not in loaded]

    first = "default" if "default" in names else names[0]
    # A saved stack loads whole from the top folder (peft_stack.json); Hugging Face PEFT knows nothing of it
    # and reads one adapter per call.
    ours = stacked if len(stacked) > 1 else [first]
    ours_call = f"PeftModel.from_pretrained(base, {repo_id!r}{'' if len(ours) > 1 else where(first)}{at_revision})"
    return [
        "## Loading", "",
        f"With [peft-core](https://pypi.org/project/peft-core/) ({install}):", "",
        "```python",
        f"from transformers import {auto_class}",
        "from peft_core import PeftModel", "",
        f"base = {auto_class}.from_pretrained({hub_base or '<the base model>'!r})",
        f"model = {ours_call}",
        *extra(ours),
        "```", "",
        "With [Hugging Face PEFT](https://github.com/huggingface/peft), for the methods it implements too, one "
        "adapter per call:", "",
        "```python",
        "from peft import PeftModel", "",
        f"model = PeftModel.from_pretrained(base, {repo_id!r}{where(first)}{at_revision})",
        *extra([first]),
        "```", "",
    ]


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.4f}%" if whole else "n/a"
