"""One base model, four PPO roles: policy, value, reward and reference.

    policy     trainable LoRA adapter "policy"               -> LM head -> logits [B, T, V]
    value      trainable LoRA adapter "value"  + ScalarHead  -> values [B, T]
    reward     frozen    LoRA adapter "reward" + ScalarHead  -> scores [B] (last real token)
    reference  the base with every adapter disabled          -> logits [B, T, V]

Usage:

    from rlhf_ext.models import SharedBase, SharedBaseArguments

    args = SharedBaseArguments(lora_r=16, load_in_4bit=True, reward_adapter_path="out/reward")
    shared = SharedBase.from_pretrained("HuggingFaceTB/SmolLM2-135M", args)
    optimizer = torch.optim.AdamW(shared.trainable_parameters(), lr=1e-5)
    with torch.no_grad():                                    # rollout scoring
        scores = shared.reward_scores(ids, mask)             # [B]
        ref_logits = shared.reference_logits(ids, mask)      # [B, T, V]
        old_values = shared.values(ids, mask)                # [B, T]
    logits = shared.policy_logits(ids, mask)                 # training: two forwards ...
    values = shared.values(ids, mask)
    loss.backward()                                          # ... one backward reaches both adapters
    shared.save_role("policy", "out/policy"); shared.save_role("value", "out/value")

With `SharedBaseArguments(value_layout="policy_trunk")` the value role has no adapter of its own: its head reads
the policy adapter's last hidden state, so one forward can serve both (`capture_last_hidden_state`).

Switching roles never changes which parameters train: peft's `set_adapter` (and leaving
`disable_adapter`) sets requires_grad=False on every adapter but the active one, and autograd
drops the gradient of a leaf whose requires_grad is off at backward time. So "policy forward,
value forward, one backward" would silently lose the policy gradients; every switch here
restores the trainable set fixed at construction.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..ops.shared_prompt import read_last_tokens
from .checkpointing import adapter_state_checkpointing
from .fingerprint import write_base_fingerprint
from .heads import ScalarHead
from .hub import push_folder_to_hub, write_model_card
from .policy_head import copying_a_tied_head
from .presets import SharedBaseArguments, policy_lora_config, quantization_config, value_lora_config
from .quantization import adapter_dtype_for, disable_cpu_4bit_repacking, is_quantized, prepare_kbit_base
from .role_checks import check_role_folder
from .role_folder import (
    HEAD_ROLES,
    check_adapter_fits,
    check_value_layout,
    load_head,
    save_adapter,
    save_adapter_with_head,
    save_head,
)
from .scoring import gather_last_token
from .shared_prompt import SharedPromptBatch, model_attention_mask

ROLES = ("policy", "value", "reward", "reference")
TRAINABLE_ROLES = ("policy", "value")


def load_base_model(args: SharedBaseArguments, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load `args.model_name_or_path` once, in `args.dtype` or quantized as `args` asks.

    `trust_remote_code` is an argument, not a field of `SharedBaseArguments`: the training configs
    (TrainingArguments) already own that flag, and one CLI cannot define it twice.
    """
    if not args.model_name_or_path:
        raise ValueError("SharedBaseArguments.model_name_or_path is not set: which base model should be loaded?")
    quantization = quantization_config(args)
    # bitsandbytes layers must be placed at load time; one device holds the whole base.
    device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"} if quantization else None
    return AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        revision=args.model_revision,
        dtype=args.torch_dtype,
        quantization_config=quantization,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        attn_implementation=args.attn_implementation,
    )


def is_adapter_parameter(name: str, adapter_name: str) -> bool:
    """Whether parameter `name` of a peft model belongs to adapter `adapter_name` (e.g. '...lora_A.policy.weight', or
    the policy's LM head copy '...lm_head.modules_to_save.policy.weight').

    The adapter name is matched right after the `lora_*` or `modules_to_save` container, so a base module that
    happens to be called "value" (BERT-style attention) is not mistaken for the value adapter.
    """
    return re.search(rf"\.(lora_[A-Za-z_]+|modules_to_save)\.{re.escape(adapter_name)}(\.|$)", name) is not None


def is_role_weight(name: str) -> bool:
    """Whether parameter `name` of a peft model is a role's own weight (LoRA, or an adapter's copy of a module)."""
    return ".lora_" in name or ".modules_to_save." in name


class SharedBase(nn.Module):
    """The four PPO roles on one base model (see the module docstring).

    Built from a transformers causal LM (`SharedBase(model, args)`, the model is wrapped in place)
    or from a checkpoint (`SharedBase.from_pretrained(path, args)`). `args` gives the LoRA shape of
    new adapters and the folders to load roles from (`*_adapter_path`). The policy adapter stays
    active between calls, so `shared.peft_model.generate(...)` samples from the policy.
    """

    def __init__(
        self, model: PreTrainedModel, args: SharedBaseArguments | None = None, trust_remote_code: bool = False
    ):
        super().__init__()
        args = args or SharedBaseArguments()
        self.args = args
        self.trust_remote_code = trust_remote_code  # for the fresh base copy that export_merged_policy loads
        self.base_model_name_or_path = args.model_name_or_path or model.config._name_or_path or None
        disable_cpu_4bit_repacking(model)
        prepare_kbit_base(model)
        self.peft_model = adapter_state_checkpointing(self._wrap_with_policy(model, args))
        self.heads = nn.ModuleDict()
        self._add_value_role(args)
        if args.reward_adapter_path:
            self._add_reward_role(args.reward_adapter_path)
        self._trainable = self._collect_trainable()
        self.match_adapter_dtype()
        self._activate("policy")

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str, args: SharedBaseArguments | None = None, trust_remote_code: bool = False
    ) -> SharedBase:
        """Load the base from `model_name_or_path` (once, maybe quantized) and build the roles from `args`."""
        args = replace(args or SharedBaseArguments(), model_name_or_path=model_name_or_path)
        return cls(load_base_model(args, trust_remote_code), args, trust_remote_code)

    # -- construction -----------------------------------------------------------------------------

    @staticmethod
    def _wrap_with_policy(model: PreTrainedModel, args: SharedBaseArguments) -> PeftModel:
        """Wrap `model` in peft with the "policy" adapter, fresh or loaded from `args.policy_adapter_path`."""
        if args.policy_adapter_path:
            base_name = args.model_name_or_path or model.config._name_or_path or None
            check_role_folder(args.policy_adapter_path, "policy", model, base_name)
            check_adapter_fits(model, args.policy_adapter_path)
            with copying_a_tied_head():  # the folder's config says whether the policy has its own LM head
                return PeftModel.from_pretrained(
                    model, args.policy_adapter_path, adapter_name="policy", is_trainable=True
                )
        with copying_a_tied_head():
            return get_peft_model(model, policy_lora_config(args, model), adapter_name="policy")

    def _add_value_role(self, args: SharedBaseArguments) -> None:
        """Add the "value" head, and its adapter unless the head sits on the policy's trunk; fresh or loaded from
        `args.value_adapter_path`."""
        if args.value_adapter_path:
            check_role_folder(args.value_adapter_path, "value", self.peft_model, self.base_model_name_or_path)
            check_value_layout(args.value_adapter_path, self.value_layout)
            if self.value_layout == "policy_trunk":
                self.heads["value"] = load_head(args.value_adapter_path, self.hidden_size).to(self.device)
            else:
                self._load_adapter_and_head("value", args.value_adapter_path, is_trainable=True)
            return
        if self.value_layout == "own_adapter":
            with copying_a_tied_head():  # value_lora_embeddings on a tied base: only the value's input side moves
                self.peft_model.add_adapter("value", value_lora_config(args, self.peft_model.get_base_model()))
        self.heads["value"] = ScalarHead(self.hidden_size).to(self.device)

    def _add_reward_role(self, directory: str | os.PathLike) -> None:
        """Load the frozen "reward" adapter and head from a role folder."""
        check_role_folder(directory, "reward", self.peft_model, self.base_model_name_or_path)
        self._load_adapter_and_head("reward", directory, is_trainable=False)
        self.heads["reward"].requires_grad_(False)

    def _load_adapter_and_head(self, role: str, directory: str | os.PathLike, is_trainable: bool) -> None:
        """Check the folder against the base, then load its adapter as `role` and its head."""
        check_adapter_fits(self.peft_model, directory)
        head = load_head(directory, expected_hidden_size=self.hidden_size)
        with copying_a_tied_head():  # a value folder with LoRA on a tied base's embeddings (value_lora_embeddings)
            self.peft_model.load_adapter(str(directory), adapter_name=role, is_trainable=is_trainable)
        self.heads[role] = head.to(self.device)

    @property
    def value_layout(self) -> str:
        """"own_adapter" (the value role has its own LoRA adapter) or "policy_trunk" (its head reads the policy's)."""
        return self.args.value_layout

    @property
    def value_adapter(self) -> str:
        """The adapter the value head reads: "value", or "policy" in the policy_trunk layout."""
        return "policy" if self.value_layout == "policy_trunk" else "value"

    def _collect_trainable(self) -> dict[str, dict[str, nn.Parameter]]:
        """role -> {name: parameter} of what trains: the policy adapter; the value adapter (if any) and head."""
        trainable = {
            role: {n: p for n, p in self.peft_model.named_parameters() if is_adapter_parameter(n, role)}
            for role in TRAINABLE_ROLES
        }
        trainable["value"].update({f"heads.value.{n}": p for n, p in self.heads["value"].named_parameters()})
        return trainable

    @property
    def adapter_dtype(self) -> torch.dtype:
        """dtype of the LoRA adapters: float32, or on a quantized base its compute dtype if that is bfloat16
        (QLoRA); peft would keep them in float32. The scalar heads are float32 always."""
        base = self.peft_model.get_base_model()
        return adapter_dtype_for(base) if is_quantized(base) else torch.float32

    def match_adapter_dtype(self) -> None:
        """Cast every adapter weight to `adapter_dtype` (in place: the parameters stay the same objects, so an
        optimizer built before keeps them). Trainers call it after TRL, which casts them to bfloat16 on any
        quantized base whatever its compute dtype."""
        dtype = self.adapter_dtype
        for name, param in self.peft_model.named_parameters():
            if ".lora_" in name and param.dtype != dtype:
                param.data = param.data.to(dtype)

    # -- role switching ---------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Hidden size H of the base (the input size of the scalar heads)."""
        return self.peft_model.get_base_model().config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        """Device of the base model's parameters."""
        return self.peft_model.get_base_model().device

    def _restore_trainable(self) -> None:
        """Set requires_grad back to True exactly on the trainable set, False on every other adapter weight."""
        trainable_names = {name for params in self._trainable.values() for name in params}
        for name, param in self.peft_model.named_parameters():
            if is_role_weight(name):
                param.requires_grad_(name in trainable_names)

    def _activate(self, role: str) -> None:
        """Make `role`'s adapter the active one, keeping the trainable set unchanged."""
        self.peft_model.set_adapter(role)
        self._restore_trainable()

    # -- gradient checkpointing -------------------------------------------------------------------

    def enable_gradient_checkpointing(self, use_reentrant: bool = False) -> None:
        """Checkpoint every decoder layer: activations are recomputed in backward instead of kept.

        Exact on the shared base: each layer's recompute runs with the role (adapter) of its first run, so
        "policy forward, value forward, one backward" gives the gradients it gives without checkpointing
        (`adapter_state_checkpointing`; trainers turn it on from `gradient_checkpointing=True`). Both of
        torch's implementations are exact; `use_reentrant=False` is the one torch recommends. Checkpointing
        acts in training mode only (`shared.train()`).
        """
        base = self.peft_model.get_base_model()
        # transformers 5 renamed the method; the old name stays as a deprecated alias until v6
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": use_reentrant})

    def disable_gradient_checkpointing(self) -> None:
        """Keep every activation again (the default)."""
        base = self.peft_model.get_base_model()
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the base checkpoints its layers (in training mode)."""
        base = self.peft_model.get_base_model()
        # transformers 5 renamed the property; the old name stays as a deprecated alias until v6
        if hasattr(type(base), "is_activation_checkpointing"):
            return base.is_activation_checkpointing
        return base.is_gradient_checkpointing

    def _require_role(self, role: str) -> None:
        """ValueError naming the missing role and how to provide it."""
        if role not in ROLES:
            raise ValueError(f"Unknown role {role!r}; roles are {ROLES}.")
        if role == "reward" and "reward" not in self.heads:
            raise ValueError(
                "No reward role: build the SharedBase with SharedBaseArguments(reward_adapter_path=<folder saved by "
                "the reward trainer>) or call load_role('reward', <folder>)."
            )

    @contextmanager
    def role(self, role: str) -> Iterator[PeftModel]:
        """Run the block with `role`'s adapter active (adapters disabled for "reference"); yields the peft model.

        The previously active adapter and the trainable set are restored on exit.
        """
        self._require_role(role)
        previous = self.peft_model.active_adapter
        try:
            if role == "reference":
                with self.peft_model.disable_adapter():
                    yield self.peft_model
            else:
                self._activate(role)
                yield self.peft_model
        finally:
            self._activate(previous)

    # -- the four forwards ------------------------------------------------------------------------

    def _last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state [B, T, H] from the decoder body alone: value and reward need no LM head."""
        body = self.peft_model.get_base_model().base_model
        return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state

    def policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of the policy (policy adapter active, LM head), with grad if enabled."""
        with self.role("policy"):
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask).logits

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, T] float32: value adapter (the policy's in the policy_trunk layout), last hidden state, value
        head; with grad if enabled. `position_ids` (and a 4-D `attention_mask`) for shared-prompt rows."""
        with self.role(self.value_adapter):
            return self.heads["value"](self._last_hidden_state(input_ids, attention_mask, position_ids))

    @contextmanager
    def capture_last_hidden_state(self) -> Iterator[list[torch.Tensor]]:
        """Collect the last hidden state [B, T, H] of every forward of the decoder body run inside the block.

        With the policy_trunk layout, the policy forward a trainer already runs (through the LM head) then also
        gives the values: `shared.heads["value"](captured[0])` is `shared.values(...)` of the same inputs, with the
        gradient reaching the policy adapter through the one graph, so no second forward and backward are needed.
        """
        captured: list[torch.Tensor] = []
        body = self.peft_model.get_base_model().base_model
        handle = body.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
        try:
            yield captured
        finally:
            handle.remove()

    @torch.no_grad()
    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reward-model scores [B] float32 at each sequence's last real token (frozen, no grad): the rule of
        `rlhf_ext.models.scoring`, the one the K-way reward trainer trains the head at."""
        with self.role("reward"):
            hidden = self._last_hidden_state(input_ids, attention_mask)
        return self.heads["reward"](gather_last_token(hidden, attention_mask))

    @torch.no_grad()
    def shared_reward_scores(self, batch: SharedPromptBatch) -> torch.Tensor:
        """`reward_scores` of the sequences laid out in shared-prompt rows (rlhf_ext/models/shared_prompt.py), [N] in
        the batch's sequence order: each read at its segment's last token, the hidden state the unshared row has at
        its last real token."""
        with self.role("reward"):
            hidden = self._last_hidden_state(batch.input_ids, model_attention_mask(batch.allowed, self.peft_model),
                                             batch.position_ids)
        return self.heads["reward"](read_last_tokens(hidden, batch.layout))

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of the base with every adapter disabled (no grad): exactly the base model's."""
        with self.role("reference"):
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask).logits

    def freeze_role(self, role: str) -> None:
        """Take a trainable role ("policy" or "value") out of the trainable set, for good: its adapter (and head)
        get requires_grad=False and keep it across role switches, and `trainable_parameters` no longer lists it
        (e.g. online DPO, which has no critic). `load_role` makes a loaded role trainable again."""
        if role not in TRAINABLE_ROLES:
            raise ValueError(f"Only {TRAINABLE_ROLES} can be frozen, got {role!r}.")
        self._trainable[role] = {}
        if role in self.heads:
            self.heads[role].requires_grad_(False)
        self._restore_trainable()

    def trainable_parameters(self, role: str | None = None) -> list[nn.Parameter]:
        """Parameters that train: all of them, or only `role`'s ("policy" or "value", e.g. for its own lr)."""
        if role is not None and role not in TRAINABLE_ROLES:
            raise ValueError(f"Only {TRAINABLE_ROLES} have trainable parameters, got {role!r}.")
        roles = TRAINABLE_ROLES if role is None else (role,)
        return [param for r in roles for param in self._trainable[r].values()]

    # -- saving and loading roles -----------------------------------------------------------------

    def save_role(self, role: str, directory: str | os.PathLike) -> Path:
        """Save one role: policy as a peft adapter folder, value/reward as adapter + head (docs/architecture.md)."""
        self._require_role(role)
        if role == "reference":
            raise ValueError("The reference role is the base model itself; there is nothing of its own to save.")
        if role == "policy":
            return save_adapter(self.peft_model, "policy", directory)
        if role == "value" and self.value_layout == "policy_trunk":
            # The head reads the policy's adapter, which the policy role saves: the head is all this role owns.
            folder = save_head(self.heads["value"], directory, "value", self.base_model_name_or_path, "policy_trunk")
            write_base_fingerprint(self.peft_model, folder, self.base_model_name_or_path)
            return folder
        return save_adapter_with_head(self.peft_model, role, self.heads[role], directory, role)

    def load_role(self, role: str, directory: str | os.PathLike) -> None:
        """Replace `role`'s adapter (and head) with the one saved in `directory`.

        The role's parameters are new objects afterwards: build the optimizer after loading.
        """
        if role not in ("policy", "value", "reward"):
            raise ValueError(f"load_role takes 'policy', 'value' or 'reward', got {role!r}.")
        check_role_folder(directory, role, self.peft_model, self.base_model_name_or_path)
        if role == "value":
            check_value_layout(directory, self.value_layout)
        if role == "value" and self.value_layout == "policy_trunk":
            self.heads["value"] = load_head(directory, expected_hidden_size=self.hidden_size).to(self.device)
            self._trainable = self._collect_trainable()
            return
        check_adapter_fits(self.peft_model, directory)
        head = load_head(directory, expected_hidden_size=self.hidden_size) if role in HEAD_ROLES else None
        if role in self.peft_model.peft_config:
            # Deleting the active adapter would leave peft to pick the next active one (with a warning).
            other = next((name for name in self.peft_model.peft_config if name != role), None)
            if other is not None:
                self._activate(other)
            self.peft_model.delete_adapter(role)
        with copying_a_tied_head():
            self.peft_model.load_adapter(str(directory), adapter_name=role, is_trainable=role in TRAINABLE_ROLES)
        if head is not None:
            self.heads[role] = head.to(self.device).requires_grad_(role in TRAINABLE_ROLES)
        self._trainable = self._collect_trainable()
        self.match_adapter_dtype()
        self._activate("policy")

    def export_merged_policy(
        self,
        directory: str | os.PathLike,
        base: str | PreTrainedModel | None = None,
        dtype: torch.dtype | None = None,
        tokenizer=None,
    ) -> Path:
        """Save the policy merged into a full-precision copy of the base as a standalone transformers model.

        The merge happens on a fresh copy (`base`: a path, a freshly built model, or by default the
        path this base was loaded from), never in the live container, whose base is also the
        reference. A quantized container is merged into the unquantized weights (loaded in `dtype`,
        default float32), so the export is the policy without quantization error. With
        policy_lm_head="trainable" the policy's head copy becomes the export's LM head (untied from the
        embeddings on a tied base). `tokenizer`, if given, is saved beside the weights so the folder is a
        complete model.
        """
        fresh = self._fresh_base(base, dtype or torch.float32)
        config = copy.deepcopy(self.peft_model.peft_config["policy"])
        config.inference_mode = True
        with copying_a_tied_head():
            merged_source = get_peft_model(fresh, config)
        state = get_peft_model_state_dict(self.peft_model, adapter_name="policy", save_embedding_layers=False)
        result = set_peft_model_state_dict(merged_source, state)
        if result.unexpected_keys:
            raise ValueError(f"The fresh base does not have modules for policy weights {result.unexpected_keys[:3]}.")
        merged = merged_source.merge_and_unload()
        directory = Path(directory)
        merged.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    def _fresh_base(self, base: str | PreTrainedModel | None, dtype: torch.dtype) -> PreTrainedModel:
        """A new, unquantized copy of the base to merge into."""
        if isinstance(base, PreTrainedModel):
            if base is self.peft_model.get_base_model():
                raise ValueError("export_merged_policy needs a fresh copy of the base, not the live one.")
            return base
        path = base or self.base_model_name_or_path
        if not path:
            raise ValueError(
                "export_merged_policy needs the base to merge into: pass base=<path or fresh model>; this SharedBase "
                "was built from an in-memory model with no name_or_path."
            )
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=self.args.model_revision, trust_remote_code=self.trust_remote_code
        )

    # -- Hub --------------------------------------------------------------------------------------

    def save_for_hub(
        self,
        role: str,
        directory: str | os.PathLike,
        merged: bool = False,
        base: str | PreTrainedModel | None = None,
        tokenizer=None,
    ) -> Path:
        """Write exactly what `push_to_hub` uploads: the role folder (or the merged policy) and README.md."""
        if merged:
            if role != "policy":
                raise ValueError("Only the policy can be exported merged; value and reward keep their head folder.")
            self.export_merged_policy(directory, base=base, tokenizer=tokenizer)
        else:
            self.save_role(role, directory)
        write_model_card(directory, self.base_model_name_or_path, role, merged)
        return Path(directory)

    def push_to_hub(
        self,
        repo_id: str,
        role: str = "policy",
        merged: bool = False,
        *,
        private: bool = False,
        token: str | None = None,
        base: str | PreTrainedModel | None = None,
        tokenizer=None,
    ):
        """Upload one role (adapter folder, or the merged policy) with a model card to `repo_id`."""
        with tempfile.TemporaryDirectory() as directory:
            self.save_for_hub(role, directory, merged=merged, base=base, tokenizer=tokenizer)
            return push_folder_to_hub(directory, repo_id, private=private, token=token)
