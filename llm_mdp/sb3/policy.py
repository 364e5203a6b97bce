"""``LMActorCriticPolicy``: an SB3 actor-critic policy over any Hugging Face causal LM.

SB3 builds a policy as ``policy_class(observation_space, action_space, lr_schedule,
use_sde=..., **policy_kwargs)`` and its default heads are MLPs on flattened features: an
action layer ``Linear(latent, V)`` and, for ``Discrete``/``MultiDiscrete`` observations,
a one-hot encoding. At a 50k vocabulary both are wrong for a language model. This policy
keeps SB3's interface (``forward``, ``evaluate_actions``, ``get_distribution``,
``predict_values``, ``predict``) and replaces the networks:

* features: :class:`TokenIdsExtractor` hands the token ids and mask through as integers
  (SB3's ``preprocess_obs`` would only cast the ``Box`` to float; it is bypassed);
* actor: the LM's own next-token logits at each row's last real token, cut to the
  ``Discrete(V)`` action space (no new action layer);
* critic: ``value_net = Linear(hidden_size, 1)`` on the LM's last hidden state at the same
  token, zero-initialised (``V(s) = 0`` at the start).

Before the forward, every row's real tokens are moved to the right end of the batch
(left-compaction: padding first, token order kept, trimmed to the longest row) and
``position_ids = cumsum(mask) - 1``, so each row sees the positions of an unpadded
forward and its last real token sits in the last column, the only one whose logits
are computed (``logits_to_keep=1`` where the model supports it).

SB3's policy is stateless, so each step runs a full forward over the prompt and the
response so far (no KV cache); that is fine for short responses. The built-in agents
(``llm_mdp.agents``) use a KV cache and one teacher-forced forward per sequence.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from llm_mdp.policies import hf
from llm_mdp.policies.base import left_compact
from llm_mdp.policies.sampling import sample_categorical

__all__ = ["LMActorCriticPolicy", "LMCategoricalDistribution", "ModelSpec", "TokenIdsExtractor"]

ModelSpec = nn.Module | Callable[[], nn.Module] | str | os.PathLike[str]
"""A causal LM, a zero-argument factory returning one, or a local path / hub id for
``AutoModelForCausalLM.from_pretrained`` (set ``HF_HUB_OFFLINE=1`` to stay offline)."""


def _check_obs_space(space: spaces.Space) -> int:
    """The observation width ``W``; raises unless the space is the token env's."""
    if isinstance(space, spaces.Dict) and {"input_ids", "attention_mask"} <= set(space.spaces):
        ids, mask = space["input_ids"], space["attention_mask"]
        if (
            isinstance(ids, spaces.Box)
            and isinstance(mask, spaces.Box)
            and len(ids.shape) == 1
            and ids.shape == mask.shape
        ):
            return int(ids.shape[0])
    raise ValueError(
        f"observation space {space} is not the token env's: expected Dict with 'input_ids' "
        "and 'attention_mask' Boxes of the same shape (W,)"
    )


def _as_long(x: torch.Tensor) -> torch.Tensor:
    # the rollout buffer stores observations as float32, exact for ids below 2**24
    return x.round().long() if x.is_floating_point() else x.long()


class TokenIdsExtractor(BaseFeaturesExtractor):
    """Pass-through features: ``(B, 2, W)`` int64, ``[:, 0]`` token ids, ``[:, 1]`` mask.

    No parameters, no one-hot, no float features: the LM embeds the ids itself.
    ``features_dim`` is ``2 * W`` (SB3 requires a positive number; nothing reads it).
    """

    def __init__(self, observation_space: spaces.Dict) -> None:
        width = _check_obs_space(observation_space)
        super().__init__(observation_space, features_dim=2 * width)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = _as_long(torch.as_tensor(observations["input_ids"]))
        mask = _as_long(torch.as_tensor(observations["attention_mask"]))
        if ids.dim() == 1:  # one unbatched observation
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        return torch.stack([ids, mask], dim=1)


class LMCategoricalDistribution(CategoricalDistribution):
    """SB3's categorical distribution with an inverse-CDF sampler.

    ``torch.multinomial`` over a 50k vocabulary is tens of times slower on CPU than
    :func:`llm_mdp.policies.sampling.sample_categorical` (same law; it uses torch's
    global RNG, which SB3's ``set_random_seed`` seeds).
    """

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        raise NotImplementedError("the LM head is the action network; no new layer is built")

    def sample(self) -> torch.Tensor:
        return sample_categorical(self.distribution.probs)


def _resolve_model(model: ModelSpec | None) -> nn.Module:
    if model is None:
        raise TypeError(
            "LMActorCriticPolicy needs a causal LM: PPO(LMActorCriticPolicy, env, "
            "policy_kwargs={'model': hf_model}) with a model, a zero-argument factory, or a "
            "path for AutoModelForCausalLM.from_pretrained"
        )
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str | os.PathLike):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(os.fspath(model))
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"the model factory {model!r} returned {type(built).__name__}, expected a "
                "torch.nn.Module (a Hugging Face causal LM)"
            )
        return built
    raise TypeError(
        f"model={model!r} ({type(model).__name__}): expected a causal LM, a zero-argument "
        "factory or a path"
    )


class LMActorCriticPolicy(ActorCriticPolicy):
    """An SB3 ``ActorCriticPolicy`` whose actor is a causal LM (see the module docstring).

    Use it as any SB3 policy class; everything but ``model`` is optional::

        PPO(LMActorCriticPolicy, env, policy_kwargs={"model": hf_model_or_factory})
        A2C(LMActorCriticPolicy, env, policy_kwargs={"model": ...})

    Args:
        observation_space: the token env's ``Dict(input_ids, attention_mask)``.
        action_space: ``Discrete(V)``; the LM head must have at least ``V`` rows (extra
            rows, e.g. embedding padding, are cut off).
        lr_schedule: given by SB3.
        model: the LM (see :data:`ModelSpec`). A factory or a path is preferable when the
            algorithm is saved: SB3 pickles ``policy_kwargs`` into the zip, and a factory
            is small (the weights are saved separately either way). A model instance is
            used as is, not copied: two policies built from one instance share weights.
        temperature: actions follow ``softmax(logits / temperature)``.
        illegal_actions: token ids that are not actions (``env.action_mask`` is False
            there: special tokens other than EOS, :func:`llm_mdp.tasks.illegal_action_ids`);
            they get probability 0. Needed with a pretrained tokenizer (the env rejects
            such a token); the built-in character tokenizers have none.
        lm_dropout: keep the LM's dropout active in SB3's training phase. Off by default:
            the LM stays in eval mode, so the log-probs of the update are those of the
            rollout up to float round-off (PPO's first-epoch ratio is 1), as RL
            fine-tuning of LMs usually does.
        share_features_extractor: True (default): one LM, the value head reads its
            hidden state and the value loss trains the LM too. False: the critic is a
            separate deep copy of the LM (twice the parameters and forwards).
        use_sde: must be False (SB3 passes it).
        optimizer_class, optimizer_kwargs: as in SB3 (A2C sets RMSprop through these).

    ``policy.parameters()`` are the LM's plus ``value_net``'s (``hidden_size + 1``), and
    the critic copy's with ``share_features_extractor=False``: no layer is as wide as
    the vocabulary besides the LM's own embedding and head.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        model: ModelSpec | None = None,
        *,
        temperature: float = 1.0,
        illegal_actions: Sequence[int] = (),
        lm_dropout: bool = False,
        share_features_extractor: bool = True,
        use_sde: bool = False,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        **unsupported: Any,
    ) -> None:
        if unsupported:
            raise TypeError(
                f"LMActorCriticPolicy does not take {sorted(unsupported)}: the networks are "
                "the LM (policy) and a linear value head; there is no MLP to configure"
            )
        if use_sde:
            raise ValueError("use_sde=True: gSDE is for continuous actions; tokens are Discrete")
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"action space {action_space}: expected Discrete(vocab_size)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        _check_obs_space(observation_space)
        lm = _resolve_model(model)
        n_actions, head = int(action_space.n), hf.lm_head_size(lm)
        if head < n_actions:
            raise ValueError(
                f"the LM head has {head} rows but the action space is Discrete({n_actions}); "
                "the model's vocabulary must cover the env's tokenizer"
            )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[],
            ortho_init=False,
            use_sde=False,
            features_extractor_class=TokenIdsExtractor,
            share_features_extractor=share_features_extractor,
            normalize_images=False,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )
        self._model_factory = None if isinstance(model, nn.Module) else model
        self.temperature = float(temperature)
        self.lm_dropout = bool(lm_dropout)
        self.n_actions = n_actions
        bad = sorted({int(i) for i in illegal_actions})
        if any(not 0 <= i < n_actions for i in bad) or len(bad) >= n_actions:
            raise ValueError(
                f"illegal_actions={bad}: expected ids in [0, {n_actions}) that leave at least "
                "one action"
            )
        self.illegal_actions: torch.Tensor = torch.tensor(bad, dtype=torch.long)
        self.model = lm
        self.value_model = None if share_features_extractor else copy.deepcopy(lm)
        self._keep_kw = hf.logits_to_keep_kw(lm)
        self.value_net = nn.Linear(hf.hidden_size(lm), 1)
        nn.init.zeros_(self.value_net.weight)
        nn.init.zeros_(self.value_net.bias)
        device = next(lm.parameters()).device
        self.value_net.to(device)
        self.action_dist = LMCategoricalDistribution(n_actions)
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.parameters(),
            lr=lr_schedule(1),
            **self.optimizer_kwargs,
        )
        self.train(self.training)

    def _build(self, lr_schedule: Schedule) -> None:
        """No-op: SB3's MLP extractor and ``Linear(latent, V)`` action layer are never
        built; the LM, the value head and the optimizer are set up in ``__init__``."""

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            "observation_space": self.observation_space,
            "action_space": self.action_space,
            "lr_schedule": self._dummy_schedule,
            "model": self._model_factory if self._model_factory is not None else self.model,
            "temperature": self.temperature,
            "lm_dropout": self.lm_dropout,
            "share_features_extractor": self.share_features_extractor,
            "optimizer_class": self.optimizer_class,
            "optimizer_kwargs": self.optimizer_kwargs,
        }

    def train(self, mode: bool = True) -> LMActorCriticPolicy:
        """SB3's ``set_training_mode``; the LM stays in eval mode unless ``lm_dropout``."""
        super().train(mode)
        if not self.lm_dropout:
            self.model.eval()
            if self.value_model is not None:
                self.value_model.eval()
        return self

    # ------------------------------------------------------------------ networks
    def extract_features(
        self, obs: PyTorchObs, features_extractor: BaseFeaturesExtractor | None = None
    ) -> torch.Tensor:
        """``(B, 2, W)`` int64 ids and mask; SB3's float preprocessing is skipped."""
        return (features_extractor or self.features_extractor)(obs)

    def _compact(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return left_compact(features[:, 0], features[:, 1])

    def _run(
        self, lm: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``(B, V)`` float32 (tempered) and last hidden state ``(B, H)``.

        The hidden state is the input of the LM head, caught by a forward pre-hook that
        lives for this call only. (``output_hidden_states=True`` would do, but
        transformers 5 then installs permanent output-capturing hooks, local functions
        that make the model unpicklable, and SB3 pickles ``policy_kwargs`` on ``save``.)
        """
        c_ids, c_mask, pos = inputs
        kwargs: dict[str, Any] = {
            "input_ids": c_ids,
            "attention_mask": c_mask,
            "position_ids": pos,
            "use_cache": False,
        }
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        caught: list[torch.Tensor] = []

        def catch(_module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            caught.append(args[0] if args else next(iter(kw.values())))

        get_head = getattr(lm, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, nn.Module):
            handle = head.register_forward_pre_hook(catch, with_kwargs=True)
            try:
                out = lm(**kwargs)
            finally:
                handle.remove()
        if caught:
            hidden = caught[-1][:, -1]
        else:  # no LM-head module was called: ask the model for its hidden states
            out = lm(**kwargs, output_hidden_states=True)
            hidden = out.hidden_states[-1][:, -1]
        logits = out.logits[:, -1, : self.n_actions].float()
        if self.illegal_actions.numel():  # not actions: probability 0
            ids = self.illegal_actions.to(logits.device)
            logits = logits.index_fill(-1, ids, float("-inf"))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits, hidden

    def _heads(
        self, obs: PyTorchObs, *, actor: bool = True, critic: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        inputs = self._compact(self.extract_features(obs))
        logits = values = None
        if actor or self.value_model is None:
            logits, hidden = self._run(self.model, inputs)
            if critic and self.value_model is None:
                values = self.value_net(hidden.to(self.value_net.weight.dtype))
        if critic and self.value_model is not None:
            _, hidden = self._run(self.value_model, inputs)
            values = self.value_net(hidden.to(self.value_net.weight.dtype))
        return logits, values

    def _dist(self, logits: torch.Tensor | None) -> Distribution:
        assert logits is not None
        return self.action_dist.proba_distribution(action_logits=logits)

    # ------------------------------------------------------------------ SB3 interface
    def forward(
        self, obs: PyTorchObs, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, values = self._heads(obs)
        assert values is not None
        dist = self._dist(logits)
        actions = dist.get_actions(deterministic=deterministic)
        return actions.reshape(-1), values, dist.log_prob(actions)

    def evaluate_actions(
        self, obs: PyTorchObs, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits, values = self._heads(obs)
        assert values is not None
        dist = self._dist(logits)
        return values, dist.log_prob(actions.reshape(-1).long()), dist.entropy()

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        logits, _ = self._heads(obs, critic=False)
        return self._dist(logits)

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        _, values = self._heads(obs, actor=False)
        assert values is not None
        return values
