"""``LLMVecEnv``: the natively batched token env behind stable-baselines3's ``VecEnv`` API.

SB3 does not accept Gymnasium vector envs; it wants its own ``VecEnv``, whose ``step``
returns ``(obs, rewards, dones, infos)`` with one ``info`` dict per env, resets finished
envs itself, keeps a finished env's last observation in
``infos[i]["terminal_observation"]`` and flags time-limit ends with
``infos[i]["TimeLimit.truncated"]`` (the only case where SB3 bootstraps a value).

That is exactly :class:`~llm_mdp.envs.LLMTokenVectorEnv` in ``SAME_STEP`` autoreset mode
with the NumPy backend, so this adapter is thin: one batched ``step`` of the native env
per SB3 step (no per-row Python env, no text decoding), ``info["final_obs"]`` rows
mapped to ``terminal_observation``, and the flags converted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.tasks import Task

__all__ = ["LLMVecEnv", "make_sb3_env"]

_PER_ENV_OPTIONS = {"prompt": "prompts", "prompt_index": "prompt_indices"}


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class LLMVecEnv(VecEnv):
    """SB3 ``VecEnv`` over one :class:`~llm_mdp.envs.LLMTokenVectorEnv` (``B`` rows = ``B`` envs).

    Args:
        env: what to run. A built-in task name (``"target_token"``), a registered id
            (``"llm_mdp/TargetToken-v0"``, built with ``gymnasium.make_vec``), a
            :class:`~llm_mdp.tasks.Task`, or an existing ``LLMTokenVectorEnv`` built with
            ``autoreset_mode="SameStep"`` (either backend; torch outputs are copied to
            NumPy). An existing env is used as is and may not be combined with
            ``num_envs`` or ``env_kwargs``.
        num_envs: number of rows ``B`` (default 1) when the env is built here.
        **env_kwargs: forwarded to ``LLMTokenVectorEnv`` when built here, e.g.
            ``max_response_tokens``, ``length_cap``, ``task_kwargs``. The adapter always
            builds it with ``autoreset_mode="SameStep"``, ``backend="numpy"`` and
            ``info_text=False`` (no text is decoded on any step).

    Step contract (SB3's): ``step(actions)`` takes ``(B,)`` token ids and returns
    ``obs`` (``{"input_ids", "attention_mask", "policy_mask"}``, each ``(B, W)``
    int64), ``rewards`` ``(B,)`` float32, ``dones`` ``(B,)`` bool (terminated or
    truncated) and a list of ``B`` info dicts. Each info has ``"TimeLimit.truncated"``
    (True only when the length cap ended the episode *and* the env was built with
    ``length_cap="truncated"``; with the default ``"terminated"`` the cap is part of the
    task and SB3 does not bootstrap).
    Multi-turn tasks work unchanged: an SB3 step is one action, and the environment's
    reply to a finished turn is appended inside that step (``policy_mask`` 0 there).
    A finished env's info also has ``"terminal_observation"`` (its last observation, a
    dict of ``(W,)`` arrays) and, for tasks with true token rewards, ``"token_rewards"``
    (``(R,)``, zero after the response, as :class:`~llm_mdp.envs.LLMTokenEnv` reports
    them); the returned ``obs`` row is already the next episode's first state.

    Seeding and options: the rows share one prompt sampler, seeded at the next
    ``reset()`` by ``seed(s)`` (SB3 calls it from ``set_random_seed``). ``set_options``
    takes :class:`~llm_mdp.envs.LLMTokenEnv`'s per-env reset options (``prompt``,
    ``prompt_index``, ``response_prefix``); every env must give the same keys.

    ``get_attr``/``set_attr``/``env_method`` act on the one batched env (there are no
    per-row env objects): ``get_attr`` and ``env_method`` return that one value once per
    requested index, and ``set_attr`` only accepts all indices.
    """

    def __init__(
        self,
        env: LLMTokenVectorEnv | Task | str,
        num_envs: int | None = None,
        **env_kwargs: Any,
    ) -> None:
        self.venv = self._build(env, num_envs, env_kwargs)
        super().__init__(
            self.venv.num_envs, self.venv.single_observation_space, self.venv.single_action_space
        )
        self.metadata = {**self.venv.metadata, "render_modes": self.metadata["render_modes"]}
        self._actions: np.ndarray | None = None

    @staticmethod
    def _build(
        env: LLMTokenVectorEnv | Task | str, num_envs: int | None, kwargs: dict[str, Any]
    ) -> LLMTokenVectorEnv:
        fixed: dict[str, Any] = {
            "autoreset_mode": AutoresetMode.SAME_STEP,
            "backend": "numpy",
            "info_text": False,
        }
        if isinstance(env, LLMTokenVectorEnv):
            if num_envs is not None or kwargs:
                raise ValueError(
                    "LLMVecEnv got an existing LLMTokenVectorEnv together with "
                    f"num_envs={num_envs!r} / {sorted(kwargs)}; configure the env itself instead"
                )
            if env.autoreset_mode != AutoresetMode.SAME_STEP:
                raise ValueError(
                    f"LLMVecEnv needs autoreset_mode=SameStep (SB3 resets finished envs within "
                    f"the step), got {env.autoreset_mode.value}; build the env with "
                    "LLMTokenVectorEnv(..., autoreset_mode='SameStep', backend='numpy', "
                    "info_text=False)"
                )
            if env.info_text:
                warnings.warn(
                    "LLMVecEnv: the env was built with info_text=True, so it decodes text every "
                    "time an episode ends; SB3 does not use it (build it with info_text=False)",
                    stacklevel=3,
                )
            return env
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise ValueError(
                f"LLMVecEnv sets {clash} itself (SameStep autoreset, numpy backend, no text); "
                "build an LLMTokenVectorEnv and pass it if you need something else"
            )
        n = 1 if num_envs is None else int(num_envs)
        if isinstance(env, str) and "/" in env:
            made = gym.make_vec(
                env, num_envs=n, vectorization_mode="vector_entry_point", **fixed, **kwargs
            )
            if not isinstance(made, LLMTokenVectorEnv):
                raise TypeError(
                    f"gymnasium.make_vec({env!r}) returned {type(made).__name__}, "
                    "expected an llm_mdp LLMTokenVectorEnv"
                )
            return made
        if not isinstance(env, Task | str):
            raise TypeError(
                f"LLMVecEnv(env=...) got {type(env).__name__}; expected a task name, a "
                "registered id, a Task or an LLMTokenVectorEnv"
            )
        return LLMTokenVectorEnv(env, n, **fixed, **kwargs)

    # ------------------------------------------------------------------ core API
    def reset(self) -> VecEnvObs:
        seed = self._seeds[0]
        options = self._merge_options(self._options)
        obs, _ = self.venv.reset(seed=seed, options=options)
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return self._obs(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(-1)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async(actions)")
        actions, self._actions = self._actions, None
        obs, reward, terminated, truncated, info = self.venv.step(actions)
        term, trunc = _np(terminated).astype(bool), _np(truncated).astype(bool)
        dones = term | trunc
        time_limit = trunc & ~term
        infos: list[dict[str, Any]] = [
            {"TimeLimit.truncated": bool(t)} for t in time_limit.tolist()
        ]
        if dones.any():
            final = {k: _np(v) for k, v in info["final_obs"].items()}
            token_rewards = _np(info["token_rewards"]) if "token_rewards" in info else None
            for i in np.flatnonzero(dones).tolist():
                last = {k: v[i] for k, v in final.items()}
                infos[i]["terminal_observation"] = last
                if token_rewards is not None:
                    infos[i]["token_rewards"] = token_rewards[i]
        return self._obs(obs), _np(reward).astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    # ------------------------------------------------------------------ SB3 plumbing
    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the next ``reset()``. The rows share one prompt sampler, so every env
        reports the same seed (SB3's default would claim ``seed + i`` per env)."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._seeds = [int(seed)] * self.num_envs
        return list(self._seeds)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """An attribute of the batched env, once per index (e.g. ``get_attr("task")``)."""
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the batched env; the rows share it, so only all indices."""
        chosen = list(self._get_indices(indices))
        if sorted(chosen) != list(range(self.num_envs)):
            raise ValueError(
                f"set_attr({attr_name!r}) on envs {chosen}: the {self.num_envs} envs are rows of "
                "one batched env and share its attributes; set it for all (indices=None)"
            )
        setattr(self.venv, attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        """Call a method of the batched env once; its result is repeated per index."""
        chosen = list(self._get_indices(indices))
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in chosen]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        """Always False: the rows are not ``gymnasium.Env`` objects, so nothing wraps them."""
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        """No images: the env renders text (``env_method("render_text")``)."""
        return [None for _ in range(self.num_envs)]

    # ------------------------------------------------------------------ helpers
    def _obs(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: _np(v) for k, v in obs.items()}

    def _merge_options(self, per_env: list[dict[str, Any]]) -> dict[str, Any] | None:
        keys = {frozenset(o) for o in per_env}
        if keys == {frozenset()}:
            return None
        if len(keys) != 1:
            raise ValueError(
                "LLMVecEnv.set_options: every env must give the same option keys (the rows "
                f"are reset together); got {[sorted(o) for o in per_env]}"
            )
        (names,) = keys
        unknown = names - {*_PER_ENV_OPTIONS, "response_prefix"}
        if unknown:
            raise ValueError(
                f"unknown reset option(s) {sorted(unknown)}; known per-env options: prompt, "
                "prompt_index, response_prefix"
            )
        merged: dict[str, Any] = {}
        for name in names:
            values = [o[name] for o in per_env]
            if name == "response_prefix":
                merged[name] = [list(map(int, v)) for v in values]
            elif name == "prompt_index":
                merged[_PER_ENV_OPTIONS[name]] = [int(v) for v in values]
            else:
                merged[_PER_ENV_OPTIONS[name]] = list(values)
        return merged


def make_sb3_env(
    env: LLMTokenVectorEnv | Task | str,
    num_envs: int | None = None,
    *,
    monitor: bool = True,
    **env_kwargs: Any,
) -> VecEnv:
    """:class:`LLMVecEnv`, by default inside SB3's ``VecMonitor`` so that SB3 logs
    ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` and ``evaluate_policy`` sees
    whole episodes. Arguments as for :class:`LLMVecEnv`."""
    venv: VecEnv = LLMVecEnv(env, num_envs, **env_kwargs)
    return VecMonitor(venv) if monitor else venv
