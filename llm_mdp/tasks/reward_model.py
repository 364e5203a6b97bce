"""Any Hugging Face sequence-classification model as a response-level reward ``RM(W)``."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_mdp.tasks.base import ResponseBatch


class HFRewardModel:
    """Score ``prompt + separator + response`` with a sequence-classification model.

    The reward is the logit of ``label`` (default 0, the single output of a typical
    reward model; use the index of the "positive" class for a sentiment classifier).
    Scoring runs under ``torch.no_grad`` in mini-batches, on the model's device, with the
    reward model's *own* tokenizer, so it may differ from the policy's.

    Args:
        model: e.g. ``AutoModelForSequenceClassification.from_pretrained(path)``.
        tokenizer: the reward model's tokenizer (needs a pad token for batching).
        label: output column used as the reward.
        separator: text placed between prompt and response.
        batch_size: responses scored per forward.
        max_length: truncation length for the reward model's input.

    Use it as a task's reward: ``Task(name, prompts, HFRewardModel(rm, rm_tok), policy_tok)``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        label: int = 0,
        separator: str = "",
        batch_size: int = 64,
        max_length: int = 512,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "reward-model tokenizer has no pad token; set tokenizer.pad_token first"
            )
        num_labels = int(getattr(model.config, "num_labels", 1))
        if not 0 <= label < num_labels:
            raise ValueError(f"label={label} but the reward model has {num_labels} output(s)")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self.separator = separator
        self.batch_size = batch_size
        self.max_length = max_length
        self.__qualname__ = f"HFRewardModel({type(model).__name__})"

    @torch.no_grad()
    def __call__(self, batch: ResponseBatch) -> torch.Tensor:
        texts = [
            p + self.separator + r for p, r in zip(batch.prompts, batch.responses, strict=True)
        ]
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(device)
            logits = self.model(**enc).logits
            out.append(logits[:, self.label].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
