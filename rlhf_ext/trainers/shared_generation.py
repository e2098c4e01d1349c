"""`SharedPrefillGenerationMixin`: with `shared_prompt` on, GRPOTrainer's transformers generation prefills each
distinct prompt once instead of once per completion (rlhf_ext/models/shared_generation.py).

A mixin of `SharedBaseGRPOTrainer` (PPO, online K-way), in a file of its own: it reads the trainer's `_shared_prompt`
switch (rlhf_ext/trainers/shared_prompt.py) and GRPOTrainer's generation settings, and changes nothing else.
"""

from __future__ import annotations

import logging

from ..models.shared_generation import shared_prefill_generation, shared_prefill_problem

logger = logging.getLogger(__name__)


class SharedPrefillGenerationMixin:
    """Goes before GRPOTrainer in the bases; needs the `_shared_prompt` switch that `SharedBaseGRPOTrainer` sets."""

    _logged_unshared_generation = False

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # Extends GRPOTrainer._generate_single_turn, whose transformers path calls the unwrapped model's `generate` on
        # each prompt's G consecutive left-padded rows: for the duration of that call, `generate` prefills each
        # distinct prompt once and hands generate the cache copied to its G rows. vLLM (which shares prefixes
        # itself), transformers' continuous batching, and the switch off run TRL's generation as it is.
        arguments = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if not self._prefills_shared(images, multimodal_fields):
            return super()._generate_single_turn(*arguments)
        model = self.accelerator.unwrap_model(self.model_wrapped)  # the model TRL's unwrap_model_for_generation yields
        with shared_prefill_generation(model, on_unshared=self._generation_runs_unshared):
            return super()._generate_single_turn(*arguments)

    def _prefills_shared(self, images, multimodal_fields) -> bool:
        """Whether this generation call prefills each prompt once: the `shared_prompt` switch is on, generation is
        transformers' `generate`, and neither the inputs (images, multimodal fields) nor the model and generation
        settings (`shared_prefill_problem`) rule it out. A problem found here is reported before TRL's generation
        starts (one log line for the run with `shared_prompt=None`, a ValueError with True)."""
        if self.use_vllm or getattr(self, "use_transformers_continuous_batching", False):
            return False
        if not self._shared_prompt.decide(self):
            return False
        carried = [name for name, value in (multimodal_fields or {}).items() if value is not None]
        if images is not None and any(image is not None for image in images):
            carried.insert(0, "images")
        problem = (f"its prompts carry {', '.join(carried)}, which the prefill does not take" if carried else
                   shared_prefill_problem(self.accelerator.unwrap_model(self.model_wrapped),
                                          generation_config=self.generation_config))
        if problem is None:
            return True
        self._generation_runs_unshared(problem)
        return False

    def _generation_runs_unshared(self, problem: str) -> None:
        """Report that generation prefills each prompt once per completion: a ValueError with `shared_prompt=True`
        (it refuses where sharing cannot be exact, as the switch does for the forwards), else one log line for the
        run."""
        if self._shared_prompt.setting:
            raise ValueError(f"shared_prompt=True, but generation cannot prefill each prompt once: {problem}. Set "
                             "shared_prompt=None to generate such batches unshared, or False.")
        if not self._logged_unshared_generation:
            logger.warning("shared_prompt: generation prefills each prompt once per completion, and will for any "
                           "call like this one: %s", problem)
            self._logged_unshared_generation = True
