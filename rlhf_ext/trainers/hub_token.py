"""No Hub token in a training config: transformers pickles the whole TrainingArguments, `hub_token` included, into
`training_args.bin` in every checkpoint and in the output folder, and `--push_to_hub` uploads that file.

The configs refuse the field wherever it is set (constructor, CLI flag, YAML key, `set_push_to_hub(token=...)`, a
later assignment), rather than scrubbing it before a save: a scrub has to catch every code path that writes the
arguments, and one missed path leaks; a token that is never stored cannot leak. The Hub client reads the token from
the HF_TOKEN environment variable or from `hf auth login`, neither of which anything here saves.
"""

from __future__ import annotations

HUB_TOKEN_REFUSED = (
    "hub_token is refused: transformers saves the training arguments, this token included, in plain text in every "
    "checkpoint's training_args.bin, and --push_to_hub uploads it. Remove --hub_token (or the hub_token key) and "
    "give the token through the HF_TOKEN environment variable, or log in once with `hf auth login`; the Hub push "
    "reads it from there."
)


class NoStoredHubToken:
    """Config mixin (list it first among the bases): setting `hub_token` to anything but None raises a ValueError
    that says where the token goes instead (never echoing it). Dataclass `__init__` and `set_push_to_hub` assign
    through `__setattr__`, so every way of setting it is covered."""

    def __setattr__(self, name, value):
        if name == "hub_token" and value is not None:
            raise ValueError(HUB_TOKEN_REFUSED)
        super().__setattr__(name, value)
